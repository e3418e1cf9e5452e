"""Weather statistics, the reduce side: a key's (partial) statistics merged, in units."""

Key = tuple[str, int, str]
Stats = dict[str, int]


def reduce(key: Key, stats: list[Stats]) -> dict[str, float]:
    count = sum(s["count"] for s in stats)
    return {"min": min(s["min"] for s in stats) / 10, "max": max(s["max"] for s in stats) / 10,
            "mean": round(sum(s["sum"] for s in stats) / count / 10, 2), "count": count}
