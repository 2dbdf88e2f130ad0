"""Signals of the prompt's text: the instruction read back from the prompt, its CLIP text embeddings, the mean of
the language model's input embeddings over the text (text-conditioned selection: CDPruner), the text tokens that
rate an image (SparseVLM)."""
from __future__ import annotations

import torch

from .. import compat
from .core import ContextBase, SpanCandidates


class TextSignals(ContextBase):
    """Text-side signals."""

    def instruction_text(self, row: int, tokens: SpanCandidates) -> str:
        """The row's text after the image, read back from the prompt's ids with the language model's tokenizer
        (special tokens skipped): the instruction a text-conditioned method scores the image against."""
        text = self.text_slots(row)
        text = text[text > tokens.slots.max()]
        ids = self.fwd.inputs["input_ids"][row, self.prev.index[row, text].to(self.fwd.inputs["input_ids"].device)]
        return self.engine.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()

    def prompt_text_embedding(self, row: int) -> torch.Tensor | None:
        """``[D]``: mean of the language model's input embeddings over the row's text tokens (every real token
        outside the visual spans, their delimiters excluded), as OpenVINO GenAI's CDPruner reads the instruction on
        models without a CLIP text tower; None for a row without text. Pre-LLM stage only (reads the LM inputs)."""
        key = ("prompt_text", row)
        if key not in self._memo:
            slots = self.text_slots(row)
            ids = self.fwd.inputs["input_ids"][row, self.prev.index[row, slots].to(self.fwd.inputs["input_ids"].device)]
            delimiters = torch.tensor(self.engine.family.delimiter_ids(self.engine.model.config), device=ids.device)
            slots = slots[~torch.isin(ids, delimiters).to(slots.device)]
            self._memo[key] = self.hidden[row, slots].float().mean(0) if len(slots) else None
        return self._memo[key]

    def instruction_embeddings(self, row: int, tokens: SpanCandidates) -> torch.Tensor | None:
        """``[M, C]``: CLIP text embeddings of the instruction (``instruction_text``), split into segments of the
        text tower's context length (the last one zero-padded, as CDPruner's official code does); None when the
        image is followed by no text."""
        key = ("instruction", row, tokens.span.index)
        if key not in self._memo:
            text = self.instruction_text(row, tokens)
            embeds = None
            if text:
                clip, length = self.engine.clip, compat.clip_context_length(self.engine.clip)
                enc = self.engine.clip_tokenizer(text=text, return_tensors="pt")
                ids, mask = enc["input_ids"], enc["attention_mask"]
                pad = -ids.shape[1] % length
                ids = torch.cat([ids, ids.new_zeros(1, pad)], 1).view(-1, length)
                mask = torch.cat([mask, mask.new_zeros(1, pad)], 1).view(-1, length)
                device = next(clip.parameters()).device
                embeds = compat.clip_text_embeddings(clip, ids.to(device), mask.to(device)).float()
            self._memo[key] = embeds
        return self._memo[key]

    def clip_image_embeddings(self, row: int, tokens: SpanCandidates) -> torch.Tensor:
        """``[c, C]``: each candidate's feature-layer hidden state in CLIP's joint image-text space (the tower's
        post-layernorm, then CLIP's visual projection; fp32)."""
        return compat.clip_image_embeddings(self.engine.model, self.engine.clip, self.vision_features(row, tokens))

    def text_raters(self, row: int, span) -> torch.Tensor:
        """Original prompt positions ``[r]`` of the text tokens that rate ``span`` (SparseVLM's raters): with ``V``
        the span's language-model input embeddings and ``X`` those of the row's real text after it, ``m =
        mean_visual(softmax_text(V X^T))`` (in ``score_dtype``) and the raters are the text tokens with ``m >
        mean(m)`` (all of them when none is; the row's last token when no text follows the span). They read the
        language model's inputs only, so they are computed once per request and shared by every stage."""
        def compute():
            text = self.prompt_text_after(row, span)
            if not len(text):
                return self.fwd.request.base.mask2d[row].nonzero().flatten()[-1:]
            v = self.input_embeddings(row, span.positions).to(self.score_dtype)
            x = self.input_embeddings(row, text).to(self.score_dtype)
            m = (v @ x.T).softmax(-1).mean(0)
            above = m > m.mean()
            return text[above.to(text.device)] if bool(above.any()) else text
        return self.request_cached(("raters", row, span.offset, self.score_dtype), compute)
