"""WordCount, the map side: every whitespace-separated token counts once.

Contract (see README, "Writing a job"):
    map(line: str) -> Iterable[tuple[key, value]]       required
    combine(key, values: list) -> value                 optional; may run 0+ times
    map_chunk(text: str) -> Iterable[tuple[key, value]] optional bulk form of map

Tokens are split with ``str.split()`` (any whitespace, so CRLF line ends vanish)
and counted case-sensitively, as Hadoop's WordCount does.
"""

from collections import Counter


def map(line):
    for word in line.split():
        yield word, 1


def combine(word, counts):
    return sum(counts)


def map_chunk(text):
    # Same result as map+combine over every line of the chunk, at C speed.
    return Counter(text.split()).items()
