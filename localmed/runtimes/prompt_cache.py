"""What the multi-sequence engine remembers between requests, as llama-server's slots do.

Each slot keeps the tokens whose keys and values are in its cells after a reply ends
(:class:`Slot`). A new request goes to the free slot whose cells share the longest prefix with
its prompt, when that prefix is at least :data:`SIMILARITY` of the prompt (llama-server's
``--slot-prompt-similarity``); otherwise to the least recently used slot. Only the rest of the
prompt is prefilled.

When a slot is taken for another conversation, what it held is copied to host memory first
(:class:`HostCache`, llama-server's ``--cache-ram``: ``llama_state_seq_get_data``), bounded in
bytes, least recently used out; a later request that shares more of its prompt with a saved
state than with any slot gets that state back into its slot (``llama_state_seq_set_data``).
So eight conversations on four slots still answer a follow-up without prefilling the record
again.

No llama.cpp here: the engine (:mod:`localmed.runtimes.batch`) moves the bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

SIMILARITY = 0.1
"""A slot is chosen for its cached prefix only when that prefix is at least this share of the
prompt (llama-server's default ``--slot-prompt-similarity``): a short shared system prompt does
not evict another conversation from a slot when an older one is free."""

MIN_SAVED = 32
"""A slot whose cells would lose fewer tokens than this is not copied to host memory: that is a
follow-up of the same conversation re-tokenizing the end of the last reply, not another one."""

CACHE_REUSE = 64
"""The chat's ``cache_reuse``: the shortest run of kept cells moved to a changed prompt's
positions (llama-server's ``--cache-reuse``). Off in ``serve``: a kept cell still carries
what came before it, so a client that deletes a message expects a prefill without it; the
chat leaves out only its own oldest turns, and keeps their faint trace as llama.cpp's context
shift does."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


MAX_CHECKPOINTS = 2
"""Window checkpoints a slot keeps (the latest; one per reply): the last turn's, for its
follow-up, and the one before, for a last message edited or sent again. (A window's cells are
not small: ~180 MB for MedGemma 4B's 1,024-token window.)"""


@dataclass(frozen=True)
class Checkpoint:
    """A sliding-window model's window cells as they were when the first ``n_tokens`` of its
    slot's tokens were in its cells (llama-server's context checkpoints): a follow-up that
    shares at least those tokens goes on from there even where the window has slid past what
    it needs (a long reply; a state read back from host memory, which holds the last window
    only)."""

    n_tokens: int
    data: bytes


@dataclass
class Slot:
    """One sequence of the context: the tokens in its cells, in position order."""

    cells: list[int] = field(default_factory=list)
    used: int = 0
    """When a request last took it (a counter; 0: never), for least-recently-used choice."""
    checkpoints: list[Checkpoint] = field(default_factory=list)
    """A sliding-window model's, oldest first."""


def choose_slot(slots: Sequence[Slot], free: Sequence[int], prompt: Sequence[int],
                *, reuse: bool) -> tuple[int, int]:
    """(the free slot a prompt goes to, the tokens of its cells the prompt starts with)."""
    if reuse:
        best, best_len = -1, 0
        for index in free:
            n = common_prefix(slots[index].cells, prompt)
            if n > best_len:
                best, best_len = index, n
        if best >= 0 and best_len >= SIMILARITY * len(prompt):
            return best, best_len
    index = min(free, key=lambda i: slots[i].used)
    return index, common_prefix(slots[index].cells, prompt) if reuse else 0


@dataclass
class SavedState:
    """A slot's cells copied to host memory: its tokens and llama.cpp's state bytes (and a
    sliding-window model's checkpoints)."""

    tokens: list[int]
    data: bytes
    checkpoints: list[Checkpoint] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.data) + sum(len(c.data) for c in self.checkpoints)


class HostCache:
    """Saved slot states, at most ``limit`` bytes together, least recently used out."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._states: OrderedDict[int, SavedState] = OrderedDict()
        self._next = 0
        self.used = 0

    def __len__(self) -> int:
        return len(self._states)

    def best(self, prompt: Sequence[int]) -> tuple[int, int]:
        """(key, shared prefix) of the saved state that shares most with ``prompt``; (-1, 0)
        when none shares any."""
        key, length = -1, 0
        for k, state in self._states.items():
            n = common_prefix(state.tokens, prompt)
            if n > length:
                key, length = k, n
        return key, length

    def take(self, key: int) -> SavedState:
        """Remove and return a saved state (it goes back into a slot)."""
        state = self._states.pop(key)
        self.used -= state.size
        return state

    def put(self, tokens: list[int], data: bytes,
            checkpoints: Sequence[Checkpoint] = ()) -> bool:
        """Keep a slot's state; False when it alone is over the limit. States it makes useless
        (their tokens a prefix of these) go, then the least recently used until it fits."""
        state = SavedState(tokens, data, list(checkpoints))
        if state.size > self.limit:
            return False
        for k in [k for k, s in self._states.items()
                  if common_prefix(s.tokens, tokens) == len(s.tokens)]:
            self.take(k)
        while self.used + state.size > self.limit:
            self.take(next(iter(self._states)))
        self._states[self._next] = state
        self._next += 1
        self.used += state.size
        return True

    def clear(self) -> None:
        self._states.clear()
        self.used = 0
