"""One line saying how a second lock differs from the first: `python scripts/lock_diff.py OLD NEW`."""
from __future__ import annotations

import sys
from pathlib import Path


def pins(path: str) -> dict[str, str]:
    """name -> version of every `name==version` line (comments and blank lines skipped)."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    return dict(line.split("==", 1) for line in lines if "==" in line)


def main(old_path: str, new_path: str) -> str:
    old, new = pins(old_path), pins(new_path)
    changes = [f"{name} {old[name]} -> {new[name]}" for name in sorted(old.keys() & new.keys())
               if old[name] != new[name]]
    changes += [f"+{name} {new[name]}" for name in sorted(new.keys() - old.keys())]
    changes += [f"-{name} {old[name]}" for name in sorted(old.keys() - new.keys())]
    detail = ": " + ", ".join(changes) if changes else " (the lock is the newest set)"
    return f"newest allowed vs {Path(old_path).name}: {len(changes)} of {len(new)} packages differ{detail}"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/lock_diff.py OLD_LOCK NEW_LOCK")
    print(main(sys.argv[1], sys.argv[2]))
