"""Live processes from /proc, for the tests that check nothing outlives a killed or finished process."""

import os


def _state_and_parent(pid: str) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, parent = f.read().rsplit(")", 1)[1].split()[:2]
    except OSError:  # gone meanwhile, or not readable
        return None
    return state, int(parent)


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie holds no memory; init reaps it)."""
    found = _state_and_parent(str(pid))
    return found is not None and found[0] != "Z"


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`: children, grandchildren, ..."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        found = _state_and_parent(entry) if entry.isdigit() else None
        if found is not None and found[0] != "Z":
            children.setdefault(found[1], []).append(int(entry))
    stack, below = [pid], []
    while stack:
        for child in children.get(stack.pop(), []):
            below.append(child)
            stack.append(child)
    return below
