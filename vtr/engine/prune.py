"""Selection at one stage: the method's choices checked and turned into the next layout (dropped,
merged and added tokens)."""
from __future__ import annotations

import dataclasses

import torch

from .. import kernels
from ..methods.base import BEFORE_LM, Merge, Stage, StageSpec
from ..report import AddedToken, MergedTokens, StageRecord
from ..signals import SelectionContext
from .core import ForwardState, RequestState, SeqLayout, clock, insertion_index


class Pruning:
    """Part of ``Engine`` (see ``vtr.engine``)."""

    def _prune(self, fwd: ForwardState, spec: StageSpec, prev: SeqLayout, hidden: torch.Tensor):
        """Select at one stage. Returns (new layout, ``[B, L']`` slots to gather, merged tokens as ``(row, [m] slots
        of prev, [m, D] embeddings, [m, levels * D] DeepStack features or None)``, ``[B, A, D]`` states of added
        tokens or None), or None if the stage removes nothing (then the model runs untouched, bit for bit). Gather slots ``>= prev.length`` are added tokens:
        slot ``prev.length + j`` is the row's ``j``-th added state."""
        start = clock(hidden)
        ctx = SelectionContext(self, fwd, prev, hidden, spec)
        request = fwd.request
        keep = prev.mask2d.clone()
        kept_ids, n_alive, dropped_any, merged, merged_record = [], [], False, [], []
        additions = [[] for _ in fwd.layout.rows]  # per row: (insert after this slot, AddedToken, anchor slot)
        for b, row in enumerate(fwd.layout.rows):
            ids, alive, row_merges = [], 0, []
            for span in row.spans:
                present = ctx.present(b, span)
                alive += len(present)
                if spec.stage is Stage.VISION:  # chosen inside the vision tower: what survived it
                    survivors = self._vision_survivors(fwd, ctx, b, present)
                    keep[b, present.slots[~survivors]] = False
                    dropped_any = dropped_any or not bool(survivors.all())
                    ids.append(span.offset + present.ids[survivors].cpu())
                    tower_merges = self._vision_merged(fwd, ctx, b, present.subset(survivors.to(present.slots.device)),
                                                       present, hidden)
                    if tower_merges is not None:
                        row_merges.append(tower_merges)
                    continue
                eligible = ctx.eligible(present)
                ids.append(span.offset + present.ids[~eligible].cpu())  # tokens the method may not drop
                for group in ctx.groups(present.subset(eligible)):
                    budget = self._checked_budget(self.method.budget_for(ctx, b, group), len(group))
                    if budget >= len(group):
                        chosen = torch.arange(len(group), device=group.slots.device)
                    else:
                        chosen = self.method.select(ctx, b, group, budget)
                        if isinstance(chosen, Merge):
                            merge = self._checked_merge(chosen, spec, budget, len(group),
                                                          len(fwd.deepstack[1]) if fwd.deepstack is not None else 0)
                            chosen = merge.keep
                            if len(merge.slots):
                                merged.append((b, group.slots[merge.slots], merge.embeds, merge.deepstack))
                                row_merges.append(MergedTokens(
                                    kept=span.offset + group.ids[merge.slots].cpu(), embeds=merge.embeds,
                                    deepstack=merge.deepstack,
                                    sources=[span.offset + group.ids[s].cpu() for s in merge.sources]))
                            if merge.added is not None:
                                after = int(group.slots[merge.keep].max())
                                for state, sources, anchor in zip(merge.added, merge.added_sources,
                                                                  merge.added_anchors.tolist()):
                                    slot = int(group.slots[anchor])
                                    token = AddedToken(span=span.offset, sources=ctx.visual_ids(b, group, sources),
                                                       position=request.original_position(b, int(prev.index[b, slot])),
                                                       layer=spec.layer, state=state)
                                    additions[b].append((after, token, slot))
                        chosen = self._checked(chosen, budget, len(group))
                        dropped = torch.ones(len(group), dtype=torch.bool, device=group.slots.device)
                        dropped[chosen] = False
                        keep[b, group.slots[dropped]] = False
                        dropped_any = dropped_any or bool(dropped.any())
                    picked = group.ids[chosen].cpu()
                    ids.append(span.offset + picked[picked < span.n])  # the image's own tokens, not added ones
            kept_ids.append(torch.cat(ids).sort().values if ids else torch.zeros(0, dtype=torch.long))
            n_alive.append(alive)
            merged_record.append(MergedTokens.join(row_merges))
        record = request.record
        recorded = merged or any(len(m.kept) for m in merged_record)  # a vision stage's merges: record only
        stage = StageRecord(stage=spec.stage.value, layer=spec.layer, n_visual=n_alive, kept=kept_ids,
                            length=prev.length, merged=merged_record if recorded else None)
        record.stages.append(stage)
        try:
            if not dropped_any and not any(additions):
                stage.index = request.public_index(prev.index)
                stage.added = self._added_record(request, prev)
                return None
            removed = prev.mask2d & ~keep
            index, local, mask2d, positions, states = prev.index, prev.local, prev.mask2d, prev.positions, None
            if any(additions):
                select = insertion_index(keep, [[after for after, _, _ in adds] for adds in additions],
                                         prev.length)
                index, local, mask2d, positions, states = self._with_added(request, prev, additions, hidden)
            else:
                select = kernels.compaction_index(keep)
            stage.length = select.shape[1]
            new_mask = kernels.gather_rows(mask2d.unsqueeze(-1), select, False).squeeze(-1)
            new_positions = kernels.gather_positions(positions, select)
            if self.stage_positions(spec) == "compact":
                if any(additions):  # renumbered: each row from its first real position, without gaps
                    first = new_positions[..., torch.arange(len(select)), new_mask.long().argmax(1)]
                    new_positions = torch.where(new_mask, first[..., None] + new_mask.long().cumsum(1) - 1, 1)
                else:
                    before = removed.long().cumsum(1) - removed.long()
                    new_positions = new_positions - kernels.gather_rows(before.unsqueeze(-1), select).squeeze(-1)
            elif self.stage_positions(spec) == "span_prefix":
                new_positions = self._span_prefix(fwd, prev, select, new_positions)
            if spec.stage in BEFORE_LM:  # the pruned sequence becomes the language model's input
                new_local = torch.arange(select.shape[1], device=select.device).expand(select.shape[0], -1)
            else:
                new_local = kernels.gather_rows(local.unsqueeze(-1), select, -1).squeeze(-1)
            added = torch.tensor([len(a) for a in additions], device=removed.device)
            layout = SeqLayout(
                index=kernels.gather_rows(index.unsqueeze(-1), select, -1).squeeze(-1),
                local=new_local, mask2d=new_mask, positions=new_positions,
                shift=prev.shift + (removed.sum(1) - added if self.stage_positions(spec) == "compact" else 0),
                layer=spec.layer,
                stage=Stage.PRE_LLM if spec.stage in BEFORE_LM else spec.stage,
                policy=self.stage_positions(spec))
            request.layouts.append(layout)
            stage.index = request.public_index(layout.index)
            stage.added = self._added_record(request, layout)
            return layout, select, merged, states
        finally:
            record.selection_seconds += clock(hidden) - start

    @staticmethod
    def _span_prefix(fwd: ForwardState, prev: SeqLayout, select: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
        """``positions`` (``[B, L']`` or ``[R, B, L']``, gathered from ``prev``) with the kept tokens of each visual
        span given the first positions its tokens held in ``prev``, in order (the ``span_prefix`` policy)."""
        positions = positions.clone()
        index = kernels.gather_rows(prev.index.unsqueeze(-1), select, -1).squeeze(-1)
        for b, row in enumerate(fwd.layout.rows):
            for span in row.spans:
                members = span.positions.to(index.device)
                kept = torch.isin(index[b], members)
                held = torch.isin(prev.index[b], members).to(prev.positions.device)
                k = int(kept.sum())
                positions[..., b, kept.to(positions.device)] = prev.positions[..., b, held][..., :k].to(positions)
        return positions

    def stage_positions(self, spec: StageSpec) -> str:
        """The position policy of one stage: its own (``StageSpec.positions``) or the method's."""
        return spec.positions or self.method.positions

    def _vision_survivors(self, fwd: ForwardState, ctx: SelectionContext, row: int, present) -> torch.Tensor:
        """``[c]`` bool: which present tokens of an image survived the vision stage (their patch is still in the
        tower at its end). Newline tokens have no patch: they stay, except, for a method whose official code
        counts them (``newline_candidates``), those of the high-resolution grid, which its anyres code drops
        (FlowCut's LLaVA-NeXT code stitches the kept tile tokens without newlines)."""
        span = present.span
        if span.kind not in self.method.visual_kinds:
            raise ValueError(f"vtr: {self.method.name} prunes images inside the vision tower; this prompt holds a "
                             f"{span.kind}")
        if span.kind != "image" or self.method.ratio == 0:  # ratio 0: the identity, newlines included
            return torch.ones(len(present), dtype=torch.bool)
        stage = fwd.vision.stage if fwd.vision is not None else None
        if stage is None:
            raise RuntimeError(f"{self.method.name}: the images of this prefill were not encoded by the patched model "
                               "in this call (pass pixel_values to forward() or generate(), not features)")
        if self.family.mrope:  # Qwen-VL: a language token is one merge unit of the tower
            alive = stage.survived_tokens()
            return alive[ctx.vision_units(row, present).to(alive.device)].cpu()
        ids = present.ids.cpu()
        newline = span.newline[ids.to(span.newline.device)].cpu()
        survivors = torch.ones(len(present), dtype=torch.bool)
        if self.method.newline_candidates:
            survivors[newline] = span.frame[ids[newline].to(span.frame.device)].cpu() == 0
        crop, index = ctx.vision_sources(row, present.subset(~newline.to(present.slots.device)))
        alive = stage.survived()
        survivors[~newline] = alive[crop.to(alive.device), index.to(alive.device)].cpu()
        return survivors

    def _vision_merged(self, fwd: ForwardState, ctx: SelectionContext, row: int, kept, present,
                       hidden: torch.Tensor) -> MergedTokens | None:
        """The image's kept tokens into which a merging vision stage (``VisionMerge``) merged others: their
        visual indices, the embeddings the language model receives for them, and the tokens of the prompt merged
        into each (itself included); None when the stage merged nothing (or on Qwen-VL towers)."""
        stage = fwd.vision.stage if fwd.vision is not None else None
        owner = getattr(stage, "owner", None)
        if owner is None or self.family.mrope or not len(kept):
            return None
        span = present.span
        free = ~span.newline[present.ids.to(span.newline.device)].cpu()
        crop, index = ctx.vision_sources(row, present.subset(free.to(present.slots.device)))
        where = {(int(c), int(t)): int(i) for c, t, i in zip(crop, index, present.ids[free.to(present.ids.device)])}
        kept = kept.subset(~span.newline[kept.ids.to(span.newline.device)].to(kept.slots.device))
        k_crop, k_index = ctx.vision_sources(row, kept)
        owner = owner.cpu()
        ids, slots, sources = [], [], []
        for c, t, i, slot in zip(k_crop.tolist(), k_index.tolist(), kept.ids.tolist(), kept.slots.tolist()):
            members = (owner[c] == t).nonzero().flatten().tolist()
            if len(members) > 1:
                ids.append(i)
                slots.append(slot)
                sources.append(span.offset + torch.tensor(sorted(where[c, m] for m in members if (c, m) in where)))
        if not ids:
            return None
        embeds = hidden[row, torch.tensor(slots).to(hidden.device)]
        return MergedTokens(kept=span.offset + torch.tensor(ids), embeds=embeds, sources=sources)

    def _with_added(self, request: RequestState, prev: SeqLayout, additions: list, hidden: torch.Tensor):
        """``prev``'s index, local slots, mask and positions extended by the rows' added tokens (column
        ``prev.length + j``: the row's ``j``-th), and their states ``[B, A, D]``. Added tokens are registered with
        the request: the ``a``-th of a row has index ``prompt_length + a``."""
        B, A = len(additions), max(len(a) for a in additions)
        device = prev.index.device
        index = torch.full((B, A), -1, dtype=prev.index.dtype, device=device)
        anchors = torch.zeros(B, A, dtype=torch.long, device=device)
        valid = torch.zeros(B, A, dtype=torch.bool, device=device)
        states = hidden.new_zeros(B, A, hidden.shape[-1])
        for b, adds in enumerate(additions):
            for j, (_, token, slot) in enumerate(adds):
                index[b, j] = request.prompt_length + len(request.added[b])
                request.added[b].append(token)
                anchors[b, j], valid[b, j] = slot, True
                states[b, j] = token.state.to(hidden.dtype)
        local = torch.where(valid, kernels.gather_rows(prev.local.unsqueeze(-1), anchors).squeeze(-1), -1)
        positions = kernels.gather_positions(prev.positions, anchors)
        return (torch.cat([prev.index, index], 1), torch.cat([prev.local, local], 1),
                torch.cat([prev.mask2d, valid], 1), torch.cat([prev.positions, positions], -1), states)

    @staticmethod
    def _added_record(request: RequestState, layout: SeqLayout) -> list | None:
        """Per row, the added tokens present in ``layout``, in sequence order (None when the request has none)."""
        if not any(request.added):
            return None
        rows = []
        for b in range(layout.index.shape[0]):
            index = layout.index[b]
            numbers = (index[index >= request.prompt_length] - request.prompt_length).tolist()
            rows.append([request.added[b][a] for a in numbers])
        return rows

    def _checked_budget(self, budget, n: int) -> int:
        """A keep count must be an int, and at least 1 for an image (or tile) with candidates: the min-1 rule."""
        if isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget:
            raise RuntimeError(f"{self.method.name}: budget_for() must return a non-negative int, got {budget!r}")
        if n and not budget:
            raise RuntimeError(f"{self.method.name}: budget_for() kept no token of an image (or tile) of {n} "
                               "candidates; every image keeps at least one (the min-1 rule)")
        return budget

    def _checked_merge(self, merge: Merge, spec: StageSpec, budget: int, n: int, levels: int = 0) -> Merge:
        """A merge must replace distinct kept tokens with one embedding each (before the language model), or add
        tokens with one state, source list and anchor each (inside it); ``levels``: the DeepStack levels the
        language model's inputs carry (Qwen3-VL), for merged DeepStack features."""
        name = self.method.name
        if len(merge.slots) and spec.stage is Stage.VISION:
            raise RuntimeError(f"{name}: replaced embeddings are not supported at the vision stage")
        if merge.added is not None:
            if spec.stage is not Stage.LAYER:
                raise RuntimeError(f"{name}: added tokens are only supported inside the language model (layer "
                                   "stages)")
            D, a = self.lm.config.hidden_size, len(merge.added)
            anchors = merge.added_anchors
            if merge.added.shape != (a, D) or len(merge.added_sources) != a or anchors is None or \
                    anchors.shape != (a,) or anchors.dtype.is_floating_point or \
                    (a and (int(anchors.min()) < 0 or int(anchors.max()) >= n)):
                raise RuntimeError(f"{name}: {a} added tokens need [{a}, {D}] states, {a} source lists and {a} "
                                   f"anchor indices in [0, {n})")
        keep = self._checked(merge.keep, budget, n)
        if not len(merge.slots):
            return dataclasses.replace(merge, keep=keep)
        slots = self._checked(merge.slots, len(merge.slots.flatten()), n) if merge.slots.numel() else \
            merge.slots.flatten().long()
        if not bool(torch.isin(slots, keep).all()):
            raise RuntimeError(f"{name}: merged slots {slots.tolist()} must be kept tokens")
        D = self.lm.config.hidden_size
        if merge.embeds.shape != (len(slots), D) or len(merge.sources) != len(slots):
            raise RuntimeError(f"{name}: a merge of {len(slots)} tokens needs [{len(slots)}, {D}] embeddings and as "
                               f"many source lists, got {tuple(merge.embeds.shape)} and {len(merge.sources)}")
        if merge.deepstack is not None:
            if spec.stage is not Stage.PRE_LLM or not levels:
                raise RuntimeError(f"{name}: merged DeepStack features apply before the language model of a model "
                                   "with DeepStack inputs (Qwen3-VL) only")
            if merge.deepstack.shape != (len(slots), levels * D):
                raise RuntimeError(f"{name}: a merge of {len(slots)} tokens needs [{len(slots)}, {levels * D}] "
                                   f"DeepStack features ({levels} levels), got {tuple(merge.deepstack.shape)}")
        return dataclasses.replace(merge, keep=keep, slots=slots)

    def _checked(self, chosen, budget: int, n: int) -> torch.Tensor:
        """A method's selection must be ``budget`` distinct integer indices in ``[0, n)``."""
        name = self.method.name
        if not isinstance(chosen, torch.Tensor) or chosen.dtype.is_floating_point or chosen.dtype.is_complex \
                or chosen.dtype == torch.bool:
            kind = chosen.dtype if isinstance(chosen, torch.Tensor) else type(chosen).__name__
            raise RuntimeError(f"{name}: select() must return an integer tensor of token indices, got {kind}")
        chosen = chosen.flatten().long()
        if len(chosen) != budget:
            raise RuntimeError(f"{name}: select() returned {len(chosen)} indices for a budget of {budget} (of {n} "
                               "tokens); the keep count must follow the method's budget_for()")
        if len(chosen) and (int(chosen.min()) < 0 or int(chosen.max()) >= n or len(chosen.unique()) != len(chosen)):
            raise RuntimeError(f"{name} selected invalid token indices {chosen.tolist()} (of {n}): each must be "
                               "distinct and in [0, n)")
        return chosen
