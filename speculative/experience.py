"""Experiences: what a rollout worker hands a learner, self-contained and sized for shipping.

Every experience carries the drafter version that produced it (``drafter_version``), so an
asynchronous pipeline can measure and bound staleness, and whatever its loss needs from the
target or the frozen reference drafter, so a learner holds only the drafter it trains.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, fields, replace

import numpy as np
import torch


def _to_array(tensor: torch.Tensor) -> tuple[str, np.ndarray]:
    """A CPU tensor as (dtype name, numpy array of its bytes' element type): numpy arrays cross
    Ray's object store without a copy (pickle protocol 5 out-of-band buffers), torch tensors do
    not (they are pickled through ``torch.save`` into bytes, several copies each way)."""
    tensor = tensor.detach().to("cpu").contiguous()
    name = str(tensor.dtype).removeprefix("torch.")
    if tensor.dtype == torch.bfloat16:
        return name, tensor.view(torch.int16).numpy()
    return name, tensor.numpy()


def _from_array(name: str, array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # a read-only object-store buffer: the learner only reads it
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if name == "bfloat16" else tensor


class _PackedTensor:
    """Pickled stand-in of a tensor field (see ``_Movable.__getstate__``)."""

    __slots__ = ("dtype", "array")

    def __init__(self, dtype: str, array: np.ndarray):
        self.dtype, self.array = dtype, array

    def __reduce__(self):
        return (_PackedTensor, (self.dtype, self.array))


class _Movable:
    """``.to(device)`` / ``.to_host()`` moving of every tensor field (nested experiences too).

    Pickling (the object store, between a rollout actor and a learner) ships every CPU tensor
    field as a numpy array, so Ray moves its bytes without copying them through ``torch.save``;
    unpickling wraps the received buffer again without a copy (read-only: learners do not write
    into experiences; ``.to(device)`` copies to the GPU)."""

    def __getstate__(self):
        state = dict(self.__dict__)
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                state[key] = _PackedTensor(*_to_array(value))
        return state

    def __setstate__(self, state):
        for key, value in state.items():
            if isinstance(value, _PackedTensor):
                state[key] = _from_array(value.dtype, value.array)
        self.__dict__.update(state)

    def _map(self, move):
        """A copy with ``move`` applied to every tensor field (nested experiences too)."""
        moved = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = move(value)
            elif isinstance(value, _Movable):
                value = value._map(move)
            moved[f.name] = value
        return replace(self, **moved)  # type: ignore[type-var]

    def _tensors(self) -> list[torch.Tensor]:
        found = []
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                found.append(value)
            elif isinstance(value, _Movable):
                found += value._tensors()
        return found

    def to(self, device: torch.device | str, non_blocking: bool = False):
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def _each_part(self, change):
        """A copy with ``change`` applied to every nested experience field."""
        changed = {f.name: change(getattr(self, f.name)) for f in fields(self)  # type: ignore[arg-type]
                   if isinstance(getattr(self, f.name), _Movable)}
        return replace(self, **changed) if changed else self  # type: ignore[type-var]

    def packed(self, form: str = "auto"):
        """For shipping: only what the losses read of the big fields (``SFTExperience.packed``,
        ``OPDExperience.packed``). ``unpacked`` (or ``concat_experiences``) restores them.
        ``form``: how the target's distributions travel where an experience holds both forms:
        ``logits``, ``hidden`` (final-norm states + lm_head rows) or ``auto`` (the fewer bytes)."""
        return self._each_part(lambda part: part.packed(form))

    def unpacked(self):
        return self._each_part(lambda part: part.unpacked())

    def to_host(self):
        """This experience on the host, for the object store. CUDA fields are copied into pinned
        host memory without blocking and one synchronize waits for them all (rather than one
        blocking copy into pageable memory per field); the values are the same as ``.to("cpu")``'s.
        An experience already on the host is returned as it is."""
        devices = {t.device for t in self._tensors() if t.device.type == "cuda"}
        if not devices:
            return self.to("cpu")

        def pinned(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.device.type != "cuda":
                return tensor.to("cpu")
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            return host.copy_(tensor, non_blocking=True)

        moved = self._map(pinned)
        for device in devices:  # nothing reads the host copies before this
            torch.cuda.synchronize(device)
        return moved

    def nbytes(self) -> int:
        """Bytes of tensor payload (what shipping this experience costs)."""
        total = 0
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, _Movable):
                total += value.nbytes()
        return total


@dataclass
class SFTExperience(_Movable):
    """One batch of teacher-forced data with the target's view of it (for training-time test)."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 on real tokens
    loss_mask: torch.Tensor  # [B, T] 1 on tokens the drafter should learn to propose
    aux_hidden: torch.Tensor  # [B, T, 3H] the target's fused-layer inputs
    target_draft_logits: torch.Tensor  # [B, T, N] target logits at the draft vocabulary
    target_top1: torch.Tensor  # [B, T] target argmax over its full vocabulary
    drafter_version: int = 0  # version of the drafter whose vocabulary shaped this experience
    # Packed for shipping: ``target_draft_logits`` then holds only these rows [n] of the flat
    # [B * T] grid, as [n, N]; None: dense [B, T, N] (what every loss reads)
    logit_rows: torch.Tensor | None = None
    # Optional, where the target's draft-vocabulary logits are a product the learner can redo:
    # the target's final-norm hidden states [B, T, H] (packed: [n, H] at ``logit_rows``) and its
    # lm_head rows at the draft vocabulary [N, H]. ``packed`` then ships these instead of the
    # logits (H + N*H/n numbers a row instead of N; a GTO experience of 32 sequences of SmolLM2
    # went from 1 426 MB to 175 MB in all on an H200), and the learner's ``unpacked`` /
    # ``concat_experiences`` multiplies them again.
    target_hidden: torch.Tensor | None = None
    draft_head: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def rows_read(self) -> torch.Tensor:
        """[B, T] bool: the rows of ``target_draft_logits`` training-time test reads (``rows_read``)."""
        return rows_read(self.loss_mask, self.attention_mask)

    def packed(self, form: str = "auto") -> SFTExperience:
        """The same experience with only the logit rows its loss reads (an OPD rollout: its
        response; ShareGPT-like data: the assistant turns), for the object store. Losses are
        bit-identical after ``unpacked``: unread rows come back as zeros, and an unread row's
        KL is multiplied by an exact zero weight either way. With ``target_hidden`` and
        ``draft_head`` the rows travel as hidden states (``target_draft_logits`` is then an empty
        [0, N] placeholder of the logits' dtype); ``unpacked`` redoes the lm_head product."""
        logits = self.target_draft_logits
        if self.logit_rows is not None or logits.shape[-1] == 0:
            return self
        rows = read_row_ids(self.loss_mask, self.attention_mask)
        if _ships_hidden(form, rows.numel(), self.target_hidden, self.draft_head):
            return self.packed_as_hidden(rows)
        return replace(self, target_draft_logits=logits.reshape(-1, logits.shape[-1]).index_select(0, rows),
                       logit_rows=rows, target_hidden=None, draft_head=None)

    def packed_as_hidden(self, rows: torch.Tensor) -> SFTExperience:
        """The packed form that carries the final-norm states at the flat ``rows`` (``read_row_ids``)
        instead of their logits, which it never reads: an experience built without its dense
        logits (``target_draft_logits`` [B, T, 0]) packs this way too."""
        hidden = self.target_hidden.reshape(-1, self.target_hidden.shape[-1]).index_select(0, rows)
        return replace(self, target_draft_logits=self.target_draft_logits.new_empty((0, self.draft_head.shape[0])),
                       target_hidden=hidden, logit_rows=rows)

    def packed_logits(self, device=None, non_blocking: bool = False) -> torch.Tensor:
        """A packed experience's logit rows [n, N] on ``device`` (default: where they are): shipped
        as they are, or the target's lm_head redone over the shipped hidden rows, in the logits' dtype."""
        if self.target_hidden is None or self.draft_head is None:
            return _put(self.target_draft_logits, device, non_blocking)
        hidden = _put(self.target_hidden, device, non_blocking)
        head = _put(self.draft_head, device, non_blocking)
        return torch.nn.functional.linear(hidden.to(head.dtype), head).to(self.target_draft_logits.dtype)

    def unpacked(self) -> SFTExperience:
        """Dense [B, T, N] logits again (zeros at the rows nobody reads), where the rows are."""
        if self.logit_rows is None:
            return self
        dense = _scatter_rows(self.packed_logits(), self.logit_rows, tuple(self.input_ids.shape))
        return replace(self, target_draft_logits=dense, logit_rows=None, target_hidden=None, draft_head=None)


@dataclass
class GTOExperience(_Movable):
    """Draft trees at groups of positions of teacher-forced sequences, scored by the target.

    Position p is index ``index[p]`` of sequence ``sequence[p]`` of ``sft`` (the tree's root is
    token ``index + 1``); ``group[p]`` numbers the window of adjacent positions it belongs to.
    ``path_ids[p, :path_length[p]]`` is the longest accepted branch of the current drafter's
    tree (greedy verification), in draft-vocabulary ids.
    """

    sft: SFTExperience  # the same sequences, for the EAGLE-3 token loss and the path replay
    sequence: torch.Tensor  # [P]
    index: torch.Tensor  # [P]
    group: torch.Tensor  # [P]
    path_ids: torch.Tensor  # [P, D] draft ids, 0-padded
    path_length: torch.Tensor  # [P]
    reward: torch.Tensor  # [P] tree reward of the current drafter's tree
    reference_reward: torch.Tensor  # [P] tree reward of the frozen reference drafter's tree
    expected_length: torch.Tensor  # [P] exact expected accepted length of the current tree
    reference_expected_length: torch.Tensor  # [P]
    rollout_path_logprob: torch.Tensor  # [P] log q(path) under the drafter that built the tree
    reference_path_logprob: torch.Tensor  # [P] log q0(path) under the reference drafter
    drafter_version: int = 0

    @property
    def num_tokens(self) -> int:
        return self.sft.num_tokens


@dataclass
class OPDExperience(_Movable):
    """Target-assisted rollouts (speculative decoding with the current drafter) and their cycles.

    ``rollout`` holds prompt + generated response per sequence (its ``loss_mask`` marks the
    response) and the target's aux states over them; its ``target_draft_logits`` is empty
    ``[B, T, 0]`` (the loss reads ``target_logprobs``, not teacher-forced logits). Cycle m anchors at index ``index[m]`` of sequence ``sequence[m]``: the drafter fed
    ``step_inputs[m, 0]`` (the committed root token) then its own proposals, drafting
    ``proposals[m, k]``; the target accepted the first ``accepted[m]``. ``target_logprobs[m, k]``
    is the target's log-distribution (draft vocabulary, T = 1) at step k's state, from the
    verification forward: conditioned on the drafted prefix, as the drafter saw it.
    """

    rollout: SFTExperience
    sequence: torch.Tensor  # [M]
    index: torch.Tensor  # [M]
    accepted: torch.Tensor  # [M] r_m
    step_inputs: torch.Tensor  # [M, K] target ids fed at steps 1..K
    proposals: torch.Tensor  # [M, K] draft ids drafted at steps 1..K
    target_logprobs: torch.Tensor  # [M, K, Vd]
    rollout_logprobs: torch.Tensor  # [M, K] log q(proposal) at rollout time
    response_tokens: int = 0
    target_forwards: int = 0  # verification forwards of the rollout (tau = tokens / forwards)
    data: SFTExperience | None = None  # the offline batch, when the EAGLE-3 loss is mixed in
    drafter_version: int = 0
    # opd.engine 'vllm': how the recomputed cycles agree with the text and with vLLM's own
    # acceptance counters (``actors.vllm_rollout``); None for draftrl's engine
    engine_report: dict | None = None
    # whether the loss reads the drafted states after each first error (``opd.rejected: suffix``)
    reads_rejected_suffix: bool = True
    # Packed for shipping: ``target_logprobs`` then holds only these rows [n] of the flat [M * K]
    # grid, as [n, Vd]; None: dense [M, K, Vd]
    logprob_rows: torch.Tensor | None = None
    # Optional (the batched engine): the target's final-norm states at the verification rows
    # [M, K, H] (packed: [n, H] at ``logprob_rows``) and its lm_head rows at the draft ids [Vd, H];
    # ``target_logprobs`` = log_softmax of their product. ``packed`` then ships these, Vd / H times
    # fewer numbers a state, and the learner redoes the product (``packed_logprobs``).
    target_hidden: torch.Tensor | None = None
    draft_head: torch.Tensor | None = None

    def logprob_rows_read(self) -> torch.Tensor:
        """[M, K] bool: the states whose target distribution the loss reads: the accepted ones
        (column < r_m) and the first error (column r_m), or every state with a rejected suffix."""
        cycles, steps = self.step_inputs.shape
        if self.reads_rejected_suffix:
            return torch.ones(cycles, steps, dtype=torch.bool, device=self.accepted.device)
        return torch.arange(steps, device=self.accepted.device)[None] <= self.accepted[:, None]

    def packed(self, form: str = "auto") -> OPDExperience:
        """``_Movable.packed`` (the rollout's and the data batch's logit rows), and only the
        target distributions the loss reads: with the authors' recipe (no rejected suffix) about
        tau of a chain's K states. Unread states come back as zeros, under exact zero weights.
        ``form``: as ``_Movable.packed`` (the target's states instead of its log-probs)."""
        out = super().packed(form)
        rows = self.logprob_rows_read().reshape(-1).nonzero().squeeze(-1)
        as_hidden = _ships_hidden(form, rows.numel(), self.target_hidden, self.draft_head)
        if out.logprob_rows is not None:
            return out
        if self.reads_rejected_suffix and not as_hidden:  # every state's log-probs, as they are
            return replace(out, target_hidden=None, draft_head=None)
        vocab = self.target_logprobs.shape[-1]
        if as_hidden:  # the states, not their distributions ([0, Vd]: the logprobs' dtype and width)
            hidden = self.target_hidden.reshape(-1, self.target_hidden.shape[-1]).index_select(0, rows)
            return replace(out, target_logprobs=self.target_logprobs.new_empty((0, vocab)), target_hidden=hidden,
                           logprob_rows=rows)
        flat = self.target_logprobs.reshape(-1, vocab)
        return replace(out, target_logprobs=flat.index_select(0, rows), logprob_rows=rows,
                       target_hidden=None, draft_head=None)

    def packed_logprobs(self, device=None, non_blocking: bool = False) -> torch.Tensor:
        """A packed experience's target log-probs [n, Vd] on ``device``: shipped as they are, or the
        log-softmax of the target's lm_head redone over the shipped states (in row blocks: the fp32
        [n, Vd] temporaries of 40k states would be gigabytes), in the log-probs' dtype."""
        if self.target_hidden is None or self.draft_head is None:
            return _put(self.target_logprobs, device, non_blocking)
        hidden = _put(self.target_hidden, device, non_blocking)
        head = _put(self.draft_head, device, non_blocking)
        out = torch.empty(hidden.shape[0], head.shape[0], dtype=self.target_logprobs.dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], LOGPROB_BLOCK_ROWS):
            block = torch.nn.functional.linear(hidden[start:start + LOGPROB_BLOCK_ROWS].to(head.dtype), head)
            out[start:start + LOGPROB_BLOCK_ROWS] = torch.log_softmax(block.float(), -1)
        return out

    def unpacked(self) -> OPDExperience:
        out = super().unpacked()
        if out.logprob_rows is None:
            return out
        return replace(out, target_logprobs=_dense_logprobs(out, out.target_logprobs.device), logprob_rows=None,
                       target_hidden=None, draft_head=None)

    @property
    def num_tokens(self) -> int:
        return self.rollout.num_tokens


@dataclass
class CombinedExperience(_Movable):
    """``objective: gto_opd``: GTO trees and Draft-OPD rollouts made from the same data batch by
    the same drafter version, trained on together in one update."""

    gto: GTOExperience
    opd: OPDExperience
    drafter_version: int = 0

    @property
    def num_tokens(self) -> int:
        return self.gto.num_tokens + self.opd.num_tokens


Experience = SFTExperience | GTOExperience | OPDExperience | CombinedExperience

LOGPROB_BLOCK_ROWS = 4096  # target states a block when redoing log-probs from shipped hidden states


def _ships_hidden(form: str, rows: int, hidden: torch.Tensor | None, head: torch.Tensor | None) -> bool:
    """Whether ``rows`` target distributions travel as final-norm states [rows, H] plus the lm_head
    rows [Vd, H] rather than as [rows, Vd] values: ``form`` hidden, or auto and fewer numbers."""
    if form not in ("auto", "hidden", "logits"):
        raise ValueError(f"packing form is 'auto', 'hidden' or 'logits', got {form!r}")
    if hidden is None or head is None or form == "logits":
        return False
    return form == "hidden" or hidden_is_smaller(rows, head)


def hidden_is_smaller(rows: int, head: torch.Tensor) -> bool:
    """Whether ``rows`` final-norm states plus the lm_head rows ``head [Vd, H]`` are fewer numbers
    than the rows' [rows, Vd] logits (what ``packed('auto')`` ships)."""
    vocab, width = head.shape
    return rows * width + vocab * width < rows * vocab


def read_row_ids(loss_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The flat [B * T] indices of ``rows_read``: the rows a packed experience keeps."""
    return rows_read(loss_mask, attention_mask).reshape(-1).nonzero().squeeze(-1)


def rows_read(loss_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the rows of the draft-vocabulary logits training-time test reads. Step k at
    index t reads row t + k where token t + k + 1 is supervised, so row j is read exactly when
    token j + 1 is (whatever k): the position before each supervised token. The rest (prompts,
    padding) only ever meets a zero weight."""
    supervised = loss_mask.bool() & attention_mask.bool()
    read = torch.zeros_like(supervised)
    read[:, :-1] = supervised[:, 1:]
    return read


def uses_reference(objective: str) -> bool:
    """Whether an objective needs GTO's frozen reference drafter on the rollout side."""
    return objective in ("gto", "gto_opd")


# -- micro-batches: several experiences as one (training.micro_batch_size) --------------------
def _pad_time(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """[B, T, ...] zero-padded to [B, length, ...]."""
    if tensor.shape[1] == length:
        return tensor
    pad = torch.zeros((tensor.shape[0], length - tensor.shape[1], *tensor.shape[2:]),
                      dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=1)


def _rows(experience: SFTExperience) -> int:
    return int(experience.input_ids.shape[0])


def _put(tensor: torch.Tensor, device, non_blocking: bool) -> torch.Tensor:
    return tensor if device is None else tensor.to(device, non_blocking=non_blocking)


def _concat_sft(parts: list[SFTExperience], device=None, non_blocking: bool = False) -> SFTExperience:
    """Sequences padded to the longest and stacked; with ``device``, each part's tensors are copied
    from where they are straight into their slice of the merged tensor on ``device``: no per-part
    device copy, padded copy and cat of the big ``target_draft_logits`` / ``aux_hidden`` (a part
    shorter than the longest still goes through one contiguous device buffer, inside ``copy_``)."""
    length = max(int(p.input_ids.shape[1]) for p in parts)
    names = ("input_ids", "attention_mask", "loss_mask", "aux_hidden", "target_draft_logits", "target_top1")
    if device is None:
        parts = [p.unpacked() for p in parts]
        merged = {name: torch.cat([_pad_time(getattr(p, name), length) for p in parts]) for name in names}
        return SFTExperience(**merged, drafter_version=parts[0].drafter_version)
    rows = sum(_rows(p) for p in parts)
    merged = {}
    for name in names:
        tensors = [getattr(p, name) for p in parts]
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])  # as torch.cat's
        trailing = tensors[0].shape[-1:] if name == "target_draft_logits" else tensors[0].shape[2:]
        out = torch.zeros((rows, length, *trailing), dtype=dtype, device=device)
        row = 0
        for part, tensor in zip(parts, tensors):
            count = part.input_ids.shape[0]
            if name == "target_draft_logits" and part.logit_rows is not None:  # packed: scatter its rows
                width = part.input_ids.shape[1]
                at = part.logit_rows.to(device, non_blocking=non_blocking)
                at = (row + at // width) * length + at % width
                out.view(rows * length, -1).index_copy_(0, at, part.packed_logits(device, non_blocking))
            else:
                out[row:row + count, :tensor.shape[1]].copy_(tensor, non_blocking=non_blocking)
            row += count
        merged[name] = out
    return SFTExperience(**merged, drafter_version=parts[0].drafter_version)


def _offsets(parts: list[SFTExperience]) -> list[int]:
    offsets, total = [], 0
    for part in parts:
        offsets.append(total)
        total += _rows(part)
    return offsets


def _concat_gto(parts: list[GTOExperience], device=None, non_blocking: bool = False) -> GTOExperience:
    offsets = _offsets([p.sft for p in parts])
    group_base, groups = 0, []
    for part in parts:  # window numbers stay distinct across the merged experiences
        groups.append(part.group + group_base)
        if part.group.numel():
            group_base += int(part.group.max()) + 1
    per_position = ("index", "path_ids", "path_length", "reward", "reference_reward", "expected_length",
                    "reference_expected_length", "rollout_path_logprob", "reference_path_logprob")
    rows = {"sequence": torch.cat([p.sequence + o for p, o in zip(parts, offsets)]), "group": torch.cat(groups),
            **{name: torch.cat([getattr(p, name) for p in parts]) for name in per_position}}
    return GTOExperience(
        sft=_concat_sft([p.sft for p in parts], device, non_blocking),
        drafter_version=parts[0].drafter_version,
        **{name: _put(value, device, non_blocking) for name, value in rows.items()},
    )


def _dense_logprobs(part: OPDExperience, device, non_blocking: bool = False) -> torch.Tensor:
    """``part.target_logprobs`` as dense [M, K, Vd] on ``device`` (scattered there when packed)."""
    if part.logprob_rows is None:
        return _put(part.target_logprobs, device, non_blocking)
    values = part.packed_logprobs(device, non_blocking)
    return _scatter_rows(values, part.logprob_rows, tuple(part.step_inputs.shape), device, non_blocking)


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, grid: tuple[int, int], device=None,
                  non_blocking: bool = False) -> torch.Tensor:
    """Packed ``values [n, V]`` at flat ``rows [n]`` of a ``grid`` as dense [*grid, V], zeros elsewhere,
    on ``device`` (default: where ``values`` are)."""
    device = device or values.device
    dense = torch.zeros(grid[0] * grid[1], values.shape[-1], dtype=values.dtype, device=device)
    dense.index_copy_(0, rows.to(device, non_blocking=non_blocking), values.to(device, non_blocking=non_blocking))
    return dense.view(*grid, -1)


def _concat_opd(parts: list[OPDExperience], device=None, non_blocking: bool = False) -> OPDExperience:
    offsets = _offsets([p.rollout for p in parts])
    per_cycle = ("index", "accepted", "step_inputs", "proposals", "rollout_logprobs")
    data = [p.data for p in parts]
    rows = {"sequence": torch.cat([p.sequence + o for p, o in zip(parts, offsets)]),
            **{name: torch.cat([getattr(p, name) for p in parts]) for name in per_cycle}}
    logprobs = torch.cat([_dense_logprobs(p, device, non_blocking) for p in parts])  # on ``device`` already
    return OPDExperience(
        target_logprobs=logprobs,
        reads_rejected_suffix=parts[0].reads_rejected_suffix,
        rollout=_concat_sft([p.rollout for p in parts], device, non_blocking),
        response_tokens=sum(p.response_tokens for p in parts),
        target_forwards=sum(p.target_forwards for p in parts),
        data=_concat_sft(data, device, non_blocking) if all(d is not None for d in data) else None,
        drafter_version=parts[0].drafter_version,
        engine_report=parts[0].engine_report,
        **{name: _put(value, device, non_blocking) for name, value in rows.items()},
    )


def concat_experiences(parts: list, device: torch.device | str | None = None,
                       non_blocking: bool = False) -> Experience:
    """One experience holding the sequences of ``parts`` (same type, same drafter version), so a
    learner runs one forward over all of them: sequences are padded to the longest, and the
    per-position / per-cycle rows are re-indexed into the merged batch.

    With ``device`` the merged experience is built there (the learner: ``parts`` come from the
    object store) and each part's tensors are copied into their slice of the merged ones;
    ``non_blocking`` copies are safe from pinned or pageable host memory alike while ``parts`` stay
    alive (the learner keeps them until it synchronizes). The values equal
    ``concat_experiences([p.to(device) for p in parts])``'s."""
    if len(parts) == 1:
        return (parts[0] if device is None else parts[0].to(device, non_blocking=non_blocking)).unpacked()
    kinds = {type(p) for p in parts}
    if len(kinds) != 1:
        raise TypeError(f"cannot merge experiences of types {sorted(k.__name__ for k in kinds)}")
    first = parts[0]
    if isinstance(first, SFTExperience):
        return _concat_sft(parts, device, non_blocking)
    if isinstance(first, GTOExperience):
        return _concat_gto(parts, device, non_blocking)
    if isinstance(first, OPDExperience):
        return _concat_opd(parts, device, non_blocking)
    if isinstance(first, CombinedExperience):
        return CombinedExperience(gto=_concat_gto([p.gto for p in parts], device, non_blocking),
                                  opd=_concat_opd([p.opd for p in parts], device, non_blocking),
                                  drafter_version=first.drafter_version)
    raise TypeError(f"cannot merge experiences of type {type(first).__name__}")
