"""The engine's slots and their cells in llama.cpp's memory: what a new request finds there.

:mod:`localmed.runtimes.prompt_cache` decides (which slot, what the host cache holds); this
moves the cells: a slot keeps the longest prefix its new prompt shares with it (or with a state
in host memory, read back with ``llama_state_seq_set_data``), after saving what it held for
another conversation (``llama_state_seq_get_data``); with ``cache_reuse`` (llama-server's
``--cache-reuse``) runs of cells that the prompt has again further on are moved to the prompt's
positions (``llama_memory_seq_add``); the rest is cut (``llama_memory_seq_rm``).

A sliding-window model (Gemma 3, MedGemma) may hold only its last ``n_swa`` positions' cells in
its sliding-window layers: a prefix is reused only when the cells it needs are there (a state
read back from host memory holds the last window only: trusting it, follow-ups went wrong by up
to 1.6 nats on a tiny Gemma 3). So, as llama-server does, the window's cells are copied when a
prompt has been prefilled (a :class:`~localmed.runtimes.prompt_cache.Checkpoint`, with
``LLAMA_STATE_SEQ_FLAGS_SWA_ONLY``), and kept with the slot and in host memory: a follow-up
whose window has slid past what it needs is read back from the last checkpoint it shares, and
prefills from there (the last reply and the new message) rather than from the start. Such a
model moves no cells (``cache_reuse``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from localmed.runtimes.prompt_cache import (
    MAX_CHECKPOINTS,
    MIN_SAVED,
    Checkpoint,
    HostCache,
    SavedState,
    Slot,
    choose_slot,
    common_prefix,
)


class SlotCells:
    """The ``n_parallel`` slots of the context ``ctx`` (sequence ids 0 … n_parallel-1)."""

    def __init__(self, llama: Any, ctx: Any, n_parallel: int, *, n_swa: int, cache_ram: int,
                 cache_reuse: int) -> None:
        self._llama, self._ctx = llama, ctx
        self._memory = llama.llama_get_memory(ctx)
        self.slots = [Slot() for _ in range(n_parallel)]
        self.n_swa = n_swa
        self.host_cache = HostCache(cache_ram)
        self.cache_reuse = cache_reuse if not n_swa and \
            llama.llama_memory_can_shift(self._memory) else 0
        self._taken = 0  # requests given a slot so far: the slots' least-recently-used clock

    def take(self, free: list[int], tokens: list[int], *, reuse: bool) -> tuple[int, int]:
        """A slot of ``free`` for a prompt of ``tokens`` (its cells made ready for it; not
        ``reuse``: none kept): the slot, and how many of the prompt's tokens are in its cells
        already."""
        slot, shared = choose_slot(self.slots, free, tokens, reuse=reuse)
        self._taken += 1
        self.slots[slot].used = self._taken
        return slot, self._reuse(slot, tokens, shared, from_host=reuse)

    def keep_prefix(self, slot: int, tokens: Sequence[int]) -> int:
        """Keep the cells ``slot`` shares with ``tokens`` (all but the last token at most),
        cut the rest; how many are kept (scoring's reuse of a few-shot prefix)."""
        cells = self.slots[slot].cells
        keep = min(common_prefix(cells, tokens), len(tokens) - 1)
        if not self._llama.llama_memory_seq_rm(self._memory, slot, keep, -1):
            return self.clear(slot)
        del cells[keep:]
        return self._window(slot, keep) if self.n_swa else keep

    def _reuse(self, slot: int, tokens: list[int], shared: int, *, from_host: bool) -> int:
        """Make ``slot`` hold the longest prefix of ``tokens`` that it (``shared`` tokens) or
        the host cache has, saving what it held for another conversation first; the number of
        prompt tokens now in its cells (at most all but the last, whose logits are needed)."""
        cells = self.slots[slot].cells
        key, saved = self.host_cache.best(tokens) if from_host else (-1, 0)
        state = self.host_cache.take(key) if saved > shared else None  # before _save evicts it
        if len(cells) - shared >= MIN_SAVED:
            self._save(slot)
        if state is not None:
            shared = saved if self._restore(slot, state) else 0
        keep = min(shared, len(tokens) - 1)
        while 0 < keep < len(tokens) and tokens[keep] < 0 and tokens[keep - 1] == tokens[keep]:
            keep -= 1  # never part of an image: its tokens attend to each other
        memory = self._memory
        if keep and self.cache_reuse:
            keep = self._shift_chunks(slot, tokens, keep)
        if keep == 0 or not self._llama.llama_memory_seq_rm(memory, slot, keep, -1):
            return self.clear(slot)  # nothing to keep, or cells that cannot be cut part way
        del cells[keep:]
        if self.n_swa:
            keep = self._window(slot, keep)
        return keep

    def _window(self, slot: int, keep: int) -> int:
        """A sliding-window model's ``keep`` cells, if its window holds the positions the next
        token attends to; else the last checkpoint within them read back and the cells cut
        there; else none. The tokens kept."""
        llama, memory, state = self._llama, self._memory, self.slots[slot]
        state.checkpoints = [c for c in state.checkpoints if c.n_tokens <= keep]
        if self._has_window(slot, keep):
            return keep
        while state.checkpoints:
            checkpoint = state.checkpoints[-1]
            keep = checkpoint.n_tokens
            if self._read_back(slot, checkpoint.data, llama.LLAMA_STATE_SEQ_FLAGS_SWA_ONLY) and \
                    llama.llama_memory_seq_rm(memory, slot, keep, -1) and \
                    self._has_window(slot, keep):
                del state.cells[keep:]
                return keep
            state.checkpoints.pop()  # (one that does not read back is no use later either)
        return self.clear(slot)

    def _has_window(self, slot: int, keep: int) -> bool:
        """Whether the cells of ``slot``'s first ``keep`` tokens reach back as far as the next
        token attends (none at all, as after a whole state is read back: no)."""
        pos_min = self._llama.llama_memory_seq_pos_min(self._memory, slot)
        return 0 <= pos_min <= max(0, keep - self.n_swa)

    def checkpoint(self, slot: int) -> None:
        """Copy a sliding-window model's window cells as they are now (a prompt prefilled,
        its first reply token not yet), for the follow-ups of this conversation."""
        state = self.slots[slot]
        data = self._copy_out(slot, self._llama.LLAMA_STATE_SEQ_FLAGS_SWA_ONLY)
        if data is None:
            return
        n_tokens = len(state.cells)
        state.checkpoints = [c for c in state.checkpoints if c.n_tokens < n_tokens]
        state.checkpoints.append(Checkpoint(n_tokens, data))
        del state.checkpoints[:-MAX_CHECKPOINTS]

    def _shift_chunks(self, slot: int, tokens: list[int], keep: int) -> int:
        """After the ``keep`` tokens a slot shares with ``tokens``, the runs of at least
        ``cache_reuse`` cells that the prompt has again further on (a chat that left some turns
        out keeps the ones after them) are moved to the prompt's positions, the cells between
        them dropped; the prompt tokens now in the slot's cells."""
        llama, memory, cells = self._llama, self._memory, self.slots[slot].cells
        end = len(tokens) - 1  # the last token is fed: its logits are needed
        at_cells, at_prompt = keep, keep
        while at_cells < len(cells) and at_prompt < end:
            run = 0
            while at_cells + run < len(cells) and at_prompt + run < end and \
                    cells[at_cells + run] == tokens[at_prompt + run] >= 0:  # (not an image's)
                run += 1
            if run < self.cache_reuse:
                at_cells += 1
                continue
            if not llama.llama_memory_seq_rm(memory, slot, at_prompt, at_cells):
                break
            llama.llama_memory_seq_add(memory, slot, at_cells, at_cells + run,
                                       at_prompt - at_cells)
            cells[at_prompt:at_prompt + run] = cells[at_cells:at_cells + run]
            at_cells += run
            at_prompt += run
        del cells[at_prompt:]  # (what is left past it is cut from the memory by the caller)
        return at_prompt

    def cut(self, slot: int, start: int) -> None:
        """Drop ``slot``'s cells from position ``start`` on (a failed image's, say)."""
        self._llama.llama_memory_seq_rm(self._memory, slot, start, -1)
        del self.slots[slot].cells[start:]
        self.slots[slot].checkpoints = [c for c in self.slots[slot].checkpoints
                                        if c.n_tokens <= start]

    def clear(self, slot: int) -> int:
        self._llama.llama_memory_seq_rm(self._memory, slot, -1, -1)
        self.slots[slot].cells.clear()
        self.slots[slot].checkpoints.clear()
        return 0

    def _save(self, slot: int) -> None:
        """Copy a slot's cells to the host cache (when it has room for them)."""
        cells = self.slots[slot].cells
        if not self.host_cache.limit or not cells:
            return
        data = self._copy_out(slot, limit=self.host_cache.limit)
        if data is not None:
            self.host_cache.put(list(cells), data, self.slots[slot].checkpoints)

    def _restore(self, slot: int, state: SavedState) -> bool:
        """Put a state taken from the host cache back into ``slot``."""
        self.clear(slot)
        if not self._read_back(slot, state.data):
            self.clear(slot)
            return False
        self.slots[slot].cells[:] = state.tokens
        self.slots[slot].checkpoints = list(state.checkpoints)
        return True

    def _copy_out(self, slot: int, flags: int = 0, *, limit: int | None = None) -> bytes | None:
        """``slot``'s state as llama.cpp writes it (``flags``: ``LLAMA_STATE_SEQ_FLAGS_*``), in
        one copy into bytes (a 7B's conversation can be a gigabyte); None when it is empty or
        over ``limit`` bytes."""
        llama = self._llama
        size = llama.llama_state_seq_get_size_ext(self._ctx, slot, flags)
        if not size or (limit is not None and size > limit):
            return None
        buffer = (ctypes.c_uint8 * size)()
        written = llama.llama_state_seq_get_data_ext(self._ctx, buffer, size, slot, flags)
        return ctypes.string_at(buffer, written) if written else None

    def _read_back(self, slot: int, data: bytes, flags: int = 0) -> bool:
        """Read a state :meth:`_copy_out` made (with the same ``flags``) into ``slot``."""
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return bool(self._llama.llama_state_seq_set_data_ext(self._ctx, buffer, len(data), slot,
                                                             flags))
