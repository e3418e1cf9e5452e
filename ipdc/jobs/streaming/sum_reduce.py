#!/usr/bin/env python3
"""A Hadoop Streaming reducer (or combiner): the sum of each key's integer values.

Its input is ``key<TAB>value`` lines sorted by key, so one key's lines are together;
it works on bytes, so keys that are not UTF-8 come out as they went in.
"""

import sys


def main() -> None:
    out = sys.stdout.buffer
    key, total = None, 0
    for line in sys.stdin.buffer:
        word, _, value = line.rstrip(b"\n").partition(b"\t")
        if word != key:
            if key is not None:
                out.write(b"%s\t%d\n" % (key, total))
            key, total = word, 0
        total += int(value)
    if key is not None:
        out.write(b"%s\t%d\n" % (key, total))


main()
