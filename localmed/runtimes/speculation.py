"""Speculative decoding by prompt lookup: a reply proposes its own next tokens from what it has
already seen, and the model checks them all in one step.

Decoding on a laptop's CPU is bound by memory: every token reads all the weights, and checking
several proposed tokens in one batch costs little more than one. A clinical reply often copies
what the clinician pasted (a medication list, a record's summary): when the reply's newest few
tokens appeared before, in the prompt or the reply, the tokens that followed them then are
proposed now (prompt lookup decoding; llama-server's ``ngram-simple``). The engine feeds the
reply's next token and the draft together, samples each position in turn with the reply's own
sampler chain, and keeps the draft up to the first token the sampler did not choose (that token
is the sampler's own, and goes on): every token is still sampled from the model's distribution,
so a greedy reply is the one it would have been (up to llama.cpp's float sums, which depend on
a batch's shape), and a seeded one draws its random numbers in the same order.

:class:`Drafter` is adaptive: a draft is as long as its expected gain pays, from the reply's
acceptance so far and what a drafted token costs the step, measured by the engine
(:class:`StepCost`: the fuller the batch, the dearer); a reply whose drafts are not worth their
cost rests, for longer each time. So free text, where lookups propose little that is taken,
costs almost nothing, and a full batch drafts nothing.

With a draft model (``--draft``: a small model of the same vocabulary, :mod:`localmed.runtimes.
draft_model`), a reply whose lookup proposes nothing asks the draft model, for free text too;
what the draft's decodes cost is measured and counted in its tokens' cost the same way (a
lookup's tokens cost nothing to propose, and copying a record is still the lookup's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from localmed.errors import SpeculationError


def speculating(asked: bool | None, draft: Path | None) -> bool:
    """Whether replies draft: as ``--speculation`` / ``--no-speculation`` say (``asked``), else
    whether ``--draft`` names a draft model (which ``--no-speculation`` contradicts)."""
    if draft is not None and asked is False:
        raise SpeculationError("--draft drafts tokens by speculation, which --no-speculation "
                               "turns off: give one of them")
    return bool(asked) or draft is not None


NGRAM_SIZES = (8, 6, 4, 3, 2)
"""Lengths of the reply's newest tokens looked up, longest first: the longest match proposes
the likeliest continuation (a record's day-by-day lines share their short n-grams; copying one
of them, a 4-gram lookup drafted the wrong day's values, and SmolLM2 took 45% of what it
drafted; from 8-grams down, the simulated gain on the same reply went from 1.5x to 2.3x)."""

DRAFT_MAX = 32
"""Tokens a draft has at most."""


class PromptLookup:
    """The tokens a reply has seen (its prompt, then what it generated), indexed by n-gram: the
    position that followed each n-gram's latest occurrence."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        tokens = self.tokens
        tokens.append(token)
        end = len(tokens) - 1  # the new token's position follows the n-grams ending before it
        for n in NGRAM_SIZES:
            if end >= n:
                self._next[tuple(tokens[end - n:end])] = end

    def draft(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the newest n-gram the last time it was seen
        (none where it was not)."""
        tokens = self.tokens
        for n in NGRAM_SIZES:
            if len(tokens) <= n:
                continue
            start = self._next.get(tuple(tokens[-n:]))
            if start is not None:
                return [t for t in tokens[start:start + limit] if t >= 0]  # (no image's ids)
        return []


PRIOR_COST = 0.3
"""What a drafted token costs, in steps of the replies decoding, until the engine has measured
it (on 2 cores, SmolLM2: 0.2 at a short context, 0.35 at 1,900 tokens; a 7B on a laptop, whose
every step reads 4 GB of weights, far less)."""

PRIOR_TRIES, PRIOR_ACCEPTANCE = 2.0, 0.5
"""A reply's acceptance before its first draft: as if it had tried this many positions and
taken this share of them (the share: the engine's recent replies', this before any)."""

PROBE = 2
"""Tokens a reply drafts when it has rested, whatever their cost (so the cost is measured)."""

DECAY = 0.8
"""Weight of a reply's earlier drafts in its acceptance, per draft."""

REST_STEPS = (16, 64, 256)
"""Steps a reply drafts nothing after its acceptance fell to a draft's cost (longer each time
it falls again; back to the first once a draft is taken)."""


class StepCost:
    """What a drafted token adds to a step, measured as the engine goes: the time of decoding
    steps without drafts (by how many replies decode together; it follows the context's growth)
    and, for each step with drafts, what each drafted token added to it, in steps. And the
    acceptance of recent replies' drafts, a new reply's prior (the work a server or a chat is
    doing now: copying from records, or not)."""

    def __init__(self, draft_prior: float = 0.0) -> None:
        self._base: dict[int, float] = {}
        self._cost: dict[int, float] = {}
        self._seen: dict[int, int] = {}
        self._tries, self._took = PRIOR_TRIES, PRIOR_TRIES * PRIOR_ACCEPTANCE
        self._draft_prior = draft_prior
        self._draft_step: float | None = None

    def drafted(self, positions: int, seconds: float) -> None:
        """A draft model's work in one step: ``positions`` decodes, one per drafted position
        (every reply drafting in each), in ``seconds``."""
        if positions:
            each = seconds / positions
            self._draft_step = each if self._draft_step is None else (
                0.8 * self._draft_step + 0.2 * each)

    def taken(self, tried: int, accepted: int) -> None:
        """A reply's draft: positions the sampler was asked about, and drafts it took."""
        self._tries = 0.98 * self._tries + tried
        self._took = 0.98 * self._took + accepted

    @property
    def acceptance(self) -> float:
        """Recent replies' acceptance (the last ~50 drafts')."""
        return self._took / self._tries

    def record(self, replies: int, drafted: int, seconds: float) -> None:
        """One decoding step (no prompt in it): ``replies`` decoding, ``drafted`` tokens
        drafted among them, how long it took (decode and sampling)."""
        base = self._base.get(replies)
        if not drafted:
            self._base[replies] = seconds if base is None else 0.7 * base + 0.3 * seconds
        elif base is not None:
            # every reply decoding waits for a drafted token: its cost is theirs together
            added = replies * max(0.0, seconds - base) / drafted / base
            cost = self._cost.get(replies)
            self._cost[replies] = added if cost is None else 0.8 * cost + 0.2 * added
            self._seen[replies] = self._seen.get(replies, 0) + 1

    def cost(self, replies: int, drafting: bool = True) -> float:
        """A drafted token's cost, in steps of the ``replies`` decoding (the fuller the batch,
        the dearer; 1 or more: none is worth drafting): checking it in the step, and drafting
        it where a draft model does (every reply waits for its decodes; ``drafting`` False: a
        lookup's token, free to propose)."""
        return self._checking(replies) + (self._drafting(replies) if drafting else 0.0)

    def _checking(self, replies: int) -> float:
        prior, seen = PRIOR_COST * replies, self._seen.get(replies, 0)
        if not seen:
            return prior
        # (the prior weighs as two steps: one step's time is noisy, and a cost that shut off
        # drafting at once could never be measured again)
        return (seen * self._cost[replies] + 2 * prior) / (seen + 2)

    def _drafting(self, replies: int) -> float:
        base = self._base.get(replies)
        if self._draft_step is None or not base:
            return self._draft_prior * replies
        return replies * self._draft_step / base


@dataclass
class Drafter:
    """One reply's speculation: its lookup, its acceptance (the share of drafted positions the
    sampler took, later drafts weighing more), and when it rests.

    A draft is as long as its expected gain pays: the k-th drafted token is taken with
    probability ``acceptance ** k``, and costs ``cost``; so k stops where the first falls below
    the second, and a reply whose acceptance is below a token's cost drafts nothing, and rests
    (then tries again, from its prior)."""

    lookup: PromptLookup
    prior: float = PRIOR_ACCEPTANCE
    """Its acceptance before its first draft (the engine's recent replies')."""
    tries: float = PRIOR_TRIES
    took: float = 0.0
    rests: int = 0
    resting: int = 0
    """Steps left to draft nothing."""
    draft: list[int] = field(default_factory=list)
    """This step's draft (fed after the reply's next token)."""

    def __post_init__(self) -> None:
        self.took = self.tries * self.prior

    @property
    def acceptance(self) -> float:
        return self.took / self.tries

    def size(self, cost: float) -> int:
        """How many tokens a draft may have at ``cost`` a token."""
        accept = self.acceptance
        if accept <= cost:
            return 0
        if accept >= 1.0 or cost <= 0.0:
            return DRAFT_MAX
        return max(1, min(DRAFT_MAX, int(math.log(cost) / math.log(accept))))

    def wanted(self, limit: int, cost: float = PRIOR_COST) -> int:
        """How long this step's draft may be: at most ``limit`` tokens (the batch's room, the
        reply's budget), each costing ``cost`` (in steps); 0 while the reply rests."""
        self.draft = []
        if self.resting:
            self.resting -= 1
            if not self.resting:  # try again, from the prior, whatever the cost says: what
                self.tries, self.took = PRIOR_TRIES, PRIOR_TRIES * self.prior  # (what a
                return max(0, min(PROBE, limit))  # cost is, is measured)
            return 0
        size = self.size(cost)
        if not size:
            self.resting = REST_STEPS[min(self.rests, len(REST_STEPS) - 1)]
            self.rests += 1
        return max(0, min(size, limit))

    def propose(self, limit: int, cost: float = PRIOR_COST) -> list[int]:
        """This step's draft by lookup (:meth:`wanted` long at most)."""
        size = self.wanted(limit, cost)
        self.draft = self.lookup.draft(size) if size else []
        return self.draft

    def taken(self, accepted: int) -> int:
        """How many tokens of this step's draft the sampler chose; the positions it was asked
        about (those past the first it did not choose were not)."""
        drafted = len(self.draft)
        self.draft = []
        if not drafted:
            return 0
        tried = accepted + (accepted < drafted)
        self.tries = DECAY * self.tries + tried
        self.took = DECAY * self.took + accepted
        if accepted:
            self.rests = 0
        return tried
