"""Download: the job manifest, sent to every worker before any task.

On receipt the agent fetches the job's code by CID into the job's own work
directory and answers ``ready`` on GetResult. Later messages of the job carry only
its id and refer back to this manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ipdc.wire.channel import Channel
from ipdc.wire.inline import Inline, check_inline
from ipdc.wire.manifest import JobManifest


@dataclass(frozen=True)
class Download:
    manifest: JobManifest
    sig: str = ""
    """Ed25519 signature by ``manifest.submitter`` over the whole message."""
    inline: Inline = field(default_factory=dict)
    """The code files' bytes, when they are small (see :mod:`ipdc.wire.inline`)."""

    def __post_init__(self) -> None:
        check_inline("download", self.inline)


DOWNLOAD: Channel[Download] = Channel("download", Download, "ipdc/peer/{node}/download")
