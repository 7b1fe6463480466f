"""What a running server's processes hold in memory, read from /proc (Linux).

RSS counts every resident page a process maps; PSS (proportional set size) counts a page that n
processes share 1/n in each, so the PSS of all a server's processes adds up to the memory the server
really takes. A served file that is memory-mapped (the dense index, the encoder's weights, the
titles, the lexical index) is one copy in the page cache however many model instances map it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Fields of /proc/PID/smaps(_rollup), in KiB.
_FIELDS = (
    "Rss",
    "Pss",
    "Anonymous",
    "Shared_Clean",
    "Shared_Dirty",
    "Private_Clean",
    "Private_Dirty",
)


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    name: str  # the model instance a backend stub runs ("search_0_1"), or "tritonserver"
    kib: dict[str, int]  # the _FIELDS

    @property
    def model(self) -> str:
        """The model this process serves ("search"), or "tritonserver"."""
        return self.name.rsplit("_", 2)[0] if self.name != "tritonserver" else self.name


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid] + [p for child in children for p in process_tree(int(child))]


def _instance_name(pid: int) -> str:
    arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if Path(arguments[0].decode()).name == "triton_python_backend_stub":
        return arguments[8].decode()  # the stub's arguments: ... shm sizes, pid, dir, id, NAME
    return Path(arguments[0].decode()).name


def _parse(lines: list[str]) -> dict[str, int]:
    found = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in _FIELDS:
            found[key] = int(value.split()[0])
    return found


def process_memory(pid: int) -> ProcessMemory:
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    return ProcessMemory(pid, _instance_name(pid), _parse(rollup))


def server_memory(pid: int) -> list[ProcessMemory]:
    """Every process of the server whose main process is ``pid``: tritonserver and its stubs."""
    return [process_memory(p) for p in process_tree(pid)]


def total_kib(processes: list[ProcessMemory], field: str = "Pss") -> int:
    return sum(p.kib.get(field, 0) for p in processes)


def file_mappings(pid: int) -> dict[Path, dict[str, int]]:
    """Per file the process maps: the _FIELDS summed over its mappings."""
    mappings: dict[Path, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and ":" not in head[0]:  # a mapping's header line
            current = None
            if len(head) == 6 and head[5].startswith("/"):
                current = mappings.setdefault(Path(head[5]), dict.fromkeys(_FIELDS, 0))
        elif current is not None:
            for key, value in _parse([line]).items():
                current[key] += value
    return mappings
