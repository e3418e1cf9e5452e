"""What the CLI prints is printed as given: a CA fingerprint such as ``7A:AB:5D`` once came
out as ``7A🆎5D``, because rich turned ``:ab:`` into an emoji."""

from __future__ import annotations

from ipdc.cli import err, out


def test_colon_codes_are_not_emoji() -> None:
    for console in (err, out):
        with console.capture() as captured:
            console.print("swarm CA 7A:AB:5D:SMILE:01", highlight=False)
        assert captured.get().strip() == "swarm CA 7A:AB:5D:SMILE:01"
