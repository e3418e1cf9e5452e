"""Weather statistics, the map side: per (station, year, element), the lowest, highest,
sum and count of a daily reading. Input is CSV in the layout of NOAA's GHCN-Daily
yearly files (values in tenths of a degree C or of a mm)::

    USC00401234,19950214,TMAX,-23,
    station,    date,    element, value, quality flag (empty: the reading passed)

Flagged readings are skipped. Values stay ints, so partial sums are exact whatever the
order in which combine and reduce see them.
"""

from collections.abc import Iterator

Key = tuple[str, int, str]
Stats = dict[str, int]


def map(line: str) -> Iterator[tuple[Key, Stats]]:
    station, date, element, value, flag = line.split(",")
    if not flag:
        reading = int(value)
        yield (station, int(date[:4]), element), {"min": reading, "max": reading, "sum": reading, "count": 1}


def combine(key: Key, stats: list[Stats]) -> Stats:
    return {"min": min(s["min"] for s in stats), "max": max(s["max"] for s in stats),
            "sum": sum(s["sum"] for s in stats), "count": sum(s["count"] for s in stats)}
