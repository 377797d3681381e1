"""The frozen snapshot ``StateManager.stats()`` returns."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .handle import StateHandle

__all__ = ["ManagerStats", "snapshot"]


@dataclass(frozen=True)
class ManagerStats(Mapping[str, Any]):
    """``by_status`` (status name -> count), ``by_executor`` (executor name -> states run),
    ``running`` (one dict per running state: name, executor, age in seconds), ``by_tag`` (tag ->
    ``{"running": int, "waiting": int, "limit": int | None}`` for every tag seen or limited).

    Reads as a mapping too: ``dict(manager.stats())`` and ``stats["by_status"]`` work.
    """

    by_status: dict[str, int]
    by_executor: dict[str, int]
    running: list[dict[str, Any]]
    by_tag: dict[str, dict[str, int | None]] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys() and key != "by_tag":  # by_tag reads {} without tags
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def _keys(self) -> tuple[str, ...]:
        """The fields; ``by_tag`` only where tags exist (limits or tagged states)."""
        return tuple(f.name for f in fields(self) if f.name != "by_tag" or self.by_tag)


def snapshot(counts: Sequence[int], by_executor: Mapping[str, int],
             running: Iterable[StateHandle], now: float,
             by_tag: dict[str, dict[str, int | None]] | None = None) -> ManagerStats:
    from .handle import StateStatus

    return ManagerStats(
        by_status={status.name: counts[status.index] for status in StateStatus},
        by_executor=dict(by_executor),
        running=[
            {"name": h.state.name, "executor": h._executor_name or h.state.executor_name,
             "age": now - (h.started_at if h.started_at is not None else h.queued_at)}
            for h in running
        ],
        by_tag=by_tag or {},
    )
