"""``IVTLR``: a transformers VLM that reasons with interleaved latent text and latent vision.

The computation is DESIGN.md §1.1: for each latent step the last-layer hidden state of the position before the
latent slot becomes the slot's input (latent text), and the K image-token embeddings that position attends to most
(averaged over layers and heads, earlier choices excluded) are inserted just before it (latent vision). This module
computes it with a key/value cache: the prompt once, then only the K+1 new rows per step (``ivtlr.chain``).
``recompute=True`` selects the original's algorithm instead (``ivtlr.recompute``), the reference the tests hold the
cached path to.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .attention_rows import AttentionRowRecorder, capture_attention_rows
from .backbones import Backbone, get_backbone
from .chain import IGNORE_INDEX, ChainRunner, SampleState, Segment
from .interventions import NO_INTERVENTION, LatentIntervention
from .loss import shifted_cross_entropy
from .selection import PATCH_ORDERS

logger = logging.getLogger(__name__)

LATENT_GRAD_MODES = ("detach", "full")
POSITION_MODES = ("original", "mrope")


@dataclass
class IVTLROutput:
    """Result of :meth:`IVTLR.forward`. Sequences are the *final* ones (prompt, V1, L1, …, Vn, Ln, rest),
    right-padded; ``attention_mask`` marks their real rows."""

    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, L, V)
    selected: list[list[torch.Tensor]]  # per sample, per step: indices into the sample's image tokens, insertion order
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor | None  # (B, L), -100 on prompt, inserted patches and latents
    loss_per_sample: torch.Tensor | None  # (B,)
    inputs_embeds: torch.Tensor  # (B, L, D) the final input embeddings
    latent_positions: list[list[int]]  # per sample: where the latent rows sit in the final sequence


@dataclass
class GenerationOutput:
    """Result of :meth:`IVTLR.generate` with ``return_dict=True``."""

    sequences: torch.Tensor  # (B, T) new token ids, padded with ``pad_token_id`` after each sample's end
    lengths: torch.Tensor  # (B,) number of generated ids per sample (EOS included)
    selected: list[list[torch.Tensor]]
    latents: list[torch.Tensor] | None = None  # per sample, (n_latent, D): the rows its latent slots received
    #: (B, 2) with ``measure_attention``: mean attention mass (over layers, heads and answer tokens) the answer
    #: tokens pay to the latent rows and to the inserted patch rows.
    answer_attention: torch.Tensor | None = None


@dataclass
class _Layout:
    """Where a sample's prompt, latents and rest are, in its real (unpadded) tokens."""

    ids: torch.Tensor
    labels: torch.Tensor
    embeds: torch.Tensor
    image_index: torch.Tensor  # prompt positions of the image tokens, in image-token order
    prompt_len: int
    n_latent: int


class IVTLR(nn.Module):
    """Wraps a (bare or PEFT-wrapped) Qwen2-VL, Qwen2.5-VL or Chameleon model.

    Args:
        model: the vision-language model.
        latent_token_id: id of ``<|latent|>``; its positions in ``input_ids`` are the latent slots.
        num_selected_patches: K, patches inserted per step (default: 32 for Qwen, 64 for Chameleon).
        latent_grad: ``detach`` (the original: no gradient through fed-back hidden states) or ``full`` (Coconut).
        positions: ``original`` (a 1-D range, as the released checkpoints were trained) or ``mrope`` (Qwen only:
            native multimodal positions for the prompt, sequential after it).
        patch_order: insertion order of the chosen patches: ``position``, ``score`` or ``topk`` (see
            :func:`ivtlr.selection.select_patches`).
        recompute: run the original's algorithm (re-run the prefix at every step, eager attention maps).
        latent_text: feed the hidden state back into each latent slot (IVT-LR). ``False`` keeps the
            ``<|latent|>`` token's own embedding there: the "latent vision only" ablation. ``num_selected_patches=0``
            is the other ablation, latent text only (Coconut).
    """

    def __init__(self, model: nn.Module, latent_token_id: int, *, num_selected_patches: int | None = None,
                 latent_grad: str = "detach", positions: str = "original", patch_order: str = "position",
                 recompute: bool = False, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, start_latent_id: int | None = None,
                 end_latent_id: int | None = None, latent_text: bool = True):
        super().__init__()
        if latent_grad not in LATENT_GRAD_MODES:
            raise ValueError(f"latent_grad must be one of {LATENT_GRAD_MODES}, got {latent_grad!r}")
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        if patch_order not in PATCH_ORDERS:
            raise ValueError(f"patch_order must be one of {PATCH_ORDERS}, got {patch_order!r}")
        self.base_model = model
        self.backbone: Backbone = get_backbone(model)
        if positions == "mrope" and self.backbone.position_rows == 1:
            raise ValueError("positions='mrope' needs a model with multimodal rotary positions (Qwen2-VL, Qwen2.5-VL)")
        self.latent_token_id = int(latent_token_id)
        self.start_latent_id, self.end_latent_id = start_latent_id, end_latent_id
        k = self.backbone.default_num_selected_patches if num_selected_patches is None else num_selected_patches
        if k < 0:
            raise ValueError(f"num_selected_patches must be >= 0, got {k}")
        self.num_selected_patches = int(k)
        self.latent_grad, self.positions, self.patch_order = latent_grad, positions, patch_order
        self.recompute, self.latent_text = recompute, latent_text
        eos = eos_token_id if eos_token_id is not None else self.backbone.eos_token_id
        self.eos_token_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self.pad_token_id = pad_token_id if pad_token_id is not None else \
            getattr(self.backbone.text_config, "pad_token_id", None) or min(self.eos_token_ids, default=0)
        self.recorder = AttentionRowRecorder(self.backbone.attention_modules())

    # ------------------------------------------------------------------------------------------ public API
    @classmethod
    def from_original(cls, base_model_dir, state_dict_path, num_selected_patches: int | None = None, **kwargs):
        """Load a checkpoint in the original IVT-LR release format; see :func:`ivtlr.original.load_original`."""
        from .original import load_original

        return load_original(cls, base_model_dir, state_dict_path, num_selected_patches=num_selected_patches,
                             **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, intervention: LatentIntervention | None = None,
                **vision_inputs: torch.Tensor | None) -> IVTLROutput:
        """The final sequences' logits (and loss, with ``labels``).

        ``vision_inputs``: whatever the family's processor returned beside the ids and the mask (``pixel_values``,
        ``image_grid_thw``, ``image_sizes``, ...), handed to the backbone as they are. ``intervention`` replaces what
        the latent steps feed back or insert (:mod:`ivtlr.interventions`; off by default)."""
        vision = _vision(vision_inputs)
        intervention = intervention or NO_INTERVENTION
        if self.recompute and not intervention.is_identity:
            raise ValueError("interventions run on the cached chain; build the engine with recompute=False")
        if self.recompute:
            from .recompute import recompute_forward

            return recompute_forward(self, input_ids, attention_mask, labels, vision)
        layouts = self._layouts(input_ids, attention_mask, labels, vision)
        grad = torch.is_grad_enabled()
        checkpointing = grad and self._gradient_checkpointing_active()
        # Gradient checkpointing cannot keep a cache inside the autograd graph. With detached latents only the final
        # pass needs gradients, so the chain runs cached without them and the final sequence once with them; with
        # `full` every pass is re-run over its whole prefix, as Coconut does.
        cached = not (checkpointing and self.latent_grad == "full")
        chain_grad = grad and not (checkpointing and self.latent_grad == "detach")
        defer_final = grad and not chain_grad
        intervention.check_batch(len(layouts))
        runner, selected = self._run_chain(layouts, vision, cached=cached, grad=chain_grad,
                                           defer_final=defer_final, intervention=intervention)
        if defer_final:
            final_pass = ChainRunner(self.backbone, self.recorder, runner.states, cached=False,
                                     dtype=runner.dtype, device=runner.device)
            final_pass.run([None] * len(layouts), query=False, grad=True)
        return self._assemble(runner.states, selected, labels is not None)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 64, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
                 return_dict: bool = False, intervention: LatentIntervention | None = None,
                 measure_attention: bool = False, **vision_inputs: torch.Tensor | None
                 ) -> torch.Tensor | GenerationOutput:
        """Decode after the latent chain, batched, continuing from the chain's own cache.

        ``input_ids`` hold the prompt with its ``<|latent|>`` slots (any padding, marked by ``attention_mask``);
        ``vision_inputs`` are the processor's other outputs, as for :meth:`forward`. Greedy by default;
        ``do_sample`` draws with ``temperature`` / ``top_p`` / ``top_k`` from ``generator``.
        Each sample stops at its first EOS (the first generated token included) or after ``max_new_tokens``.
        ``intervention`` replaces what the latent steps feed back or insert (:mod:`ivtlr.interventions`; off by
        default); ``measure_attention`` also reports the attention the answer tokens pay to the latent and patch rows.
        Returns the new ids, (B, T), padded with ``pad_token_id``.
        """
        (out,) = self.generate_variants(input_ids, attention_mask, interventions=[intervention or NO_INTERVENTION],
                                        max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                        pad_token_id=pad_token_id, do_sample=do_sample, temperature=temperature,
                                        top_p=top_p, top_k=top_k, generator=generator,
                                        measure_attention=measure_attention, **vision_inputs)
        return out if return_dict else out.sequences

    @torch.no_grad()
    def generate_variants(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                          interventions: Sequence[LatentIntervention], max_new_tokens: int = 64,
                          eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                          do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                          generator: torch.Generator | None = None, measure_attention: bool = False,
                          **vision_inputs: torch.Tensor | None) -> list[GenerationOutput]:
        """:meth:`generate` once per intervention on the same batch, the prompt pass computed once and shared."""
        if self.recompute and any(not i.is_identity for i in interventions):
            raise ValueError("interventions run on the cached chain; build the engine with recompute=False")
        eos = self.eos_token_ids if eos_token_id is None else \
            set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        pad = self.pad_token_id if pad_token_id is None else pad_token_id
        vision = _vision(vision_inputs)
        layouts = self._layouts(input_ids, attention_mask, None, vision)
        for intervention in interventions:
            intervention.check_batch(len(layouts))
        query = measure_attention or max(lay.n_latent for lay in layouts) > 0
        with capture_attention_rows(self.recorder, self.backbone.attn_implementation):
            prefilled, rows = self._prefill(layouts, vision, cached=True, grad=False, query=query)
        outputs = []
        for i, intervention in enumerate(interventions):
            runner = prefilled.fork() if i < len(interventions) - 1 else prefilled
            with capture_attention_rows(self.recorder, self.backbone.attn_implementation):
                selected, final_rows = self._latent_passes(layouts, runner, rows, grad=False,
                                                           intervention=intervention, query_last=measure_attention)
            pick = _TokenPicker(do_sample, temperature, top_p, top_k, generator)
            decoder = _Decoder(self, runner, layouts, final_rows if measure_attention else None)
            sequences, lengths, attention = decoder.run(pick, max_new_tokens, eos, pad, input_ids.device)
            outputs.append(GenerationOutput(sequences=sequences, lengths=lengths, selected=selected,
                                            latents=[self._fed_latents(st) for st in runner.states],
                                            answer_attention=attention))
        return outputs

    @torch.no_grad()
    def image_token_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                               **vision_inputs: torch.Tensor | None) -> list[torch.Tensor]:
        """Per sample, (N, D): the image-token embeddings the latent vision inserts rows from (donor images)."""
        layouts = self._layouts(input_ids, attention_mask, None, _vision(vision_inputs))
        return [lay.embeds[lay.image_index] for lay in layouts]

    def image_grid(self, vision_inputs: Mapping[str, torch.Tensor | None], sample: int) -> tuple[int, int]:
        """(rows, cols) of a sample's image-token grid, what ``selected`` indices are laid out on, from the batch's
        vision inputs (the processor's outputs)."""
        return self.backbone.image_grid(_vision(vision_inputs), sample)

    # ------------------------------------------------------------------------------------------ internals
    def _gradient_checkpointing_active(self) -> bool:
        model = self.backbone.model
        flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
            else "is_gradient_checkpointing"
        return bool(getattr(model, flag, False)) and model.training

    def _layouts(self, input_ids, attention_mask, labels, vision: Mapping[str, torch.Tensor]) -> list[_Layout]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embedded = self.backbone.embed(input_ids, vision)
        layouts = []
        for b in range(input_ids.shape[0]):
            real = attention_mask[b].bool()
            ids = input_ids[b, real]
            lab = labels[b, real] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
            latent_at = (ids == self.latent_token_id).nonzero().flatten().tolist()
            if latent_at and latent_at != list(range(latent_at[0], latent_at[0] + len(latent_at))):
                raise ValueError(f"sample {b}: the <|latent|> tokens must be consecutive, found them at {latent_at}")
            prompt_len = latent_at[0] if latent_at else len(ids)
            image_at = embedded.image_mask[b, real].nonzero().flatten()
            if len(image_at) and int(image_at[-1]) >= prompt_len:
                raise ValueError(f"sample {b}: image tokens must come before the first <|latent|> token")
            if latent_at and not len(image_at) and self.num_selected_patches:
                logger.debug("sample %d has latent steps but no image: latent vision is empty", b)
            layouts.append(_Layout(ids=ids, labels=lab, embeds=embedded.embeds[b, real], image_index=image_at,
                                   prompt_len=prompt_len, n_latent=len(latent_at)))
        return layouts

    def _prompt_segments(self, layouts: list[_Layout], vision: Mapping[str, torch.Tensor]) -> list[Segment]:
        """Right-padded prompts -> one segment each, with the backbone's prompt positions."""
        device = layouts[0].ids.device
        lengths = [lay.prompt_len if lay.n_latent else len(lay.ids) for lay in layouts]
        width = max(lengths)
        ids = torch.full((len(layouts), width), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for b, (lay, n) in enumerate(zip(layouts, lengths)):
            ids[b, :n], mask[b, :n] = lay.ids[:n], 1
        positions, next_start = self.backbone.prompt_positions(ids, mask, vision, self.positions)
        return [Segment(lay.embeds[:n], positions[:, b, :n], lay.labels[:n]) for b, (lay, n) in
                enumerate(zip(layouts, lengths))], next_start.tolist()

    def _run_chain(self, layouts: list[_Layout], vision: Mapping[str, torch.Tensor], *, cached: bool, grad: bool,
                   defer_final: bool = False, intervention: LatentIntervention = NO_INTERVENTION):
        """Prompt pass, then one pass per latent step; returns the runner (segments and hidden states) and the
        selections. ``defer_final``: the caller re-runs the whole final sequence, so the last pass is skipped."""
        with capture_attention_rows(self.recorder, self.backbone.attn_implementation):
            runner, rows = self._prefill(layouts, vision, cached=cached, grad=grad,
                                         query=max(lay.n_latent for lay in layouts) > 0)
            selected, _ = self._latent_passes(layouts, runner, rows, grad=grad, defer_final=defer_final,
                                              intervention=intervention)
        return runner, selected

    def _prefill(self, layouts: list[_Layout], vision: Mapping[str, torch.Tensor], *, cached: bool, grad: bool,
                 query: bool):
        """The prompt pass; returns the runner and the attention rows of each prompt's last row (or None)."""
        prompts, next_start = self._prompt_segments(layouts, vision)
        states = [SampleState(next_position=int(p)) for p in next_start]
        runner = ChainRunner(self.backbone, self.recorder, states, cached=cached, dtype=layouts[0].embeds.dtype,
                             device=layouts[0].ids.device)
        return runner, runner.run(prompts, query=query, grad=grad)

    def _latent_passes(self, layouts: list[_Layout], runner: ChainRunner, rows: torch.Tensor | None, *, grad: bool,
                       defer_final: bool = False, intervention: LatentIntervention = NO_INTERVENTION,
                       query_last: bool = False):
        """One pass per latent step after the prompt pass. Returns the selections and, per sample, the attention
        row of its last row once its chain is done (when ``query_last``: the row that predicts its first answer
        token; None for samples without latent steps)."""
        device = layouts[0].ids.device
        n_max = max(lay.n_latent for lay in layouts)
        selected: list[list[torch.Tensor]] = [[] for _ in layouts]
        taken = [torch.zeros(len(lay.image_index), dtype=torch.bool, device=device) for lay in layouts]
        final_rows: list[torch.Tensor | None] = [None] * len(layouts)
        rows_r = self.backbone.position_rows
        for step in range(1, n_max + 1):
            new: list[Segment | None] = []
            for b, lay in enumerate(layouts):
                if lay.n_latent < step:
                    new.append(None)
                    continue
                new.append(self._latent_step_segment(lay, runner.states[b], runner.last_hidden(b), rows[b],
                                                     taken[b], selected[b], step, rows_r, intervention, b))
            query = any(lay.n_latent > step for lay in layouts) or query_last
            if query or not defer_final:
                rows = runner.run(new, query=query, grad=grad)
                if query_last:
                    for b, lay in enumerate(layouts):
                        if lay.n_latent == step:
                            final_rows[b] = rows[b]
            else:
                for state, seg in zip(runner.states, new):
                    if seg is not None:
                        state.segments.append(seg)
        return selected, final_rows

    def _latent_step_segment(self, lay: _Layout, state: SampleState, fill: torch.Tensor, rows: torch.Tensor,
                             taken: torch.Tensor, selected: list[torch.Tensor], step: int, rows_r: int,
                             intervention: LatentIntervention = NO_INTERVENTION, sample: int = 0) -> Segment:
        """Rows [V_step, L_step] (plus the rest of the sample after its last latent)."""
        device = lay.ids.device
        scores = rows[lay.image_index] if len(lay.image_index) else rows[:0]
        k = self.num_selected_patches if intervention.num_selected_patches is None \
            else intervention.num_selected_patches
        chosen = intervention.choose_patches(sample, step, scores, taken, k, self.patch_order)
        taken[chosen] = True
        selected.append(chosen)
        latent_slot = lay.prompt_len + step - 1
        if not self.latent_text:
            fill = lay.embeds[latent_slot]
        elif self.latent_grad == "detach":
            fill = fill.detach()
        fill = intervention.latent_row(sample, step, fill, lay.embeds[latent_slot])
        image_rows = lay.embeds[lay.image_index]
        parts = [intervention.patch_rows(sample, chosen, image_rows), fill.unsqueeze(0).to(lay.embeds.dtype)]
        labels = [torch.full((len(chosen),), IGNORE_INDEX, device=device), lay.labels[latent_slot:latent_slot + 1]]
        if step == lay.n_latent:
            rest = slice(lay.prompt_len + lay.n_latent, len(lay.ids))
            parts.append(lay.embeds[rest])
            labels.append(lay.labels[rest])
        embeds = torch.cat(parts)
        return Segment(embeds, state.positions(embeds.shape[0], rows_r, device), torch.cat(labels),
                       latent_row=len(chosen))

    def _assemble(self, states: list[SampleState], selected, with_labels: bool) -> IVTLROutput:
        hidden = [torch.cat([seg.hidden for seg in st.segments]) for st in states]
        embeds = [torch.cat([seg.embeds for seg in st.segments]) for st in states]
        labels = [torch.cat([seg.labels for seg in st.segments]) for st in states]
        latent_positions = [self._latent_rows(st) for st in states]
        width = max(h.shape[0] for h in hidden)
        batch, device = len(states), hidden[0].device
        pad_h = torch.zeros(batch, width, hidden[0].shape[-1], dtype=hidden[0].dtype, device=device)
        pad_e = torch.zeros(batch, width, embeds[0].shape[-1], dtype=embeds[0].dtype, device=device)
        pad_l = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long, device=device)
        mask = torch.zeros(batch, width, dtype=torch.long, device=device)
        for b in range(batch):
            n = hidden[b].shape[0]
            pad_h[b, :n], pad_e[b, :n], pad_l[b, :n], mask[b, :n] = hidden[b], embeds[b], labels[b], 1
        logits = self.backbone.logits(pad_h)
        loss = loss_per_sample = None
        if with_labels:
            loss, loss_per_sample = shifted_cross_entropy(logits, pad_l)
        return IVTLROutput(loss=loss, logits=logits, selected=selected, attention_mask=mask,
                           labels=pad_l if with_labels else None, loss_per_sample=loss_per_sample,
                           inputs_embeds=pad_e, latent_positions=latent_positions)

    @staticmethod
    def _fed_latents(state: SampleState) -> torch.Tensor:
        """(n_latent, D): the rows the sample's latent slots received."""
        rows = [seg.embeds[seg.latent_row] for seg in state.segments if seg.latent_row is not None]
        dim = state.segments[0].embeds.shape[-1]
        return torch.stack(rows) if rows else state.segments[0].embeds.new_zeros(0, dim)

    @staticmethod
    def _latent_rows(state: SampleState) -> list[int]:
        """Final-sequence index of each latent row."""
        rows, start = [], 0
        for seg in state.segments:
            if seg.latent_row is not None:
                rows.append(start + seg.latent_row)
            start += seg.length
        return rows


def _vision(vision_inputs: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """The processor outputs the backbone reads, without the ones given as None."""
    return {key: value for key, value in vision_inputs.items() if value is not None}


class _TokenPicker:
    """Greedy argmax, or sampling with temperature / top-k / top-p (transformers' own logits warpers)."""

    def __init__(self, do_sample: bool, temperature: float, top_p: float, top_k: int,
                 generator: torch.Generator | None):
        from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                            TopKLogitsWarper, TopPLogitsWarper)

        self.do_sample, self.generator = do_sample, generator
        self.warpers = LogitsProcessorList()
        if do_sample:
            if temperature <= 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
            if temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                self.warpers.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(-1)
        probs = self.warpers(None, logits).softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


class _Decoder:
    """Greedy or sampled decoding continuing a finished latent chain, batched; optionally measures the attention the
    answer tokens pay to the latent and inserted patch rows."""

    def __init__(self, engine: IVTLR, runner: ChainRunner, layouts: list[_Layout],
                 first_rows: list[torch.Tensor | None] | None):
        self.engine, self.runner, self.layouts = engine, runner, layouts
        self.measure = first_rows is not None
        batch = len(layouts)
        self.columns = [self._columns(state) for state in runner.states]
        self.mass = torch.zeros(batch, 2)
        self.counted = torch.zeros(batch)
        if self.measure:
            for b, row in enumerate(first_rows):
                self._add(b, row)

    @staticmethod
    def _columns(state: SampleState) -> tuple[list[int], list[int]]:
        """Physical cache columns of the sample's latent rows and of its inserted patch rows."""
        latent, patches = [], []
        for seg in state.segments:
            if seg.latent_row is not None:
                latent.append(seg.column + seg.latent_row)
                patches.extend(range(seg.column, seg.column + seg.latent_row))
        return latent, patches

    def _add(self, b: int, row: torch.Tensor | None) -> None:
        latent, patches = self.columns[b]
        if row is not None:
            self.mass[b, 0] += float(row[latent].sum()) if latent else 0.0
            self.mass[b, 1] += float(row[patches].sum()) if patches else 0.0
        self.counted[b] += 1

    def run(self, pick: _TokenPicker, max_new_tokens: int, eos: set[int], pad: int, device
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        runner, batch = self.runner, len(self.layouts)
        backbone = self.engine.backbone
        hidden = torch.stack([runner.last_hidden(b) for b in range(batch)])
        tokens = pick(backbone.logits(hidden.unsqueeze(1))[:, -1].float())
        out = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        active = torch.ones(batch, dtype=torch.bool, device=device)
        embed = backbone.input_embeddings()
        eos_ids = torch.tensor(sorted(eos), device=device) if eos else None
        for step in range(max_new_tokens):
            out[active, step] = tokens[active]
            lengths += active.long()
            if eos_ids is not None:
                active &= ~torch.isin(tokens, eos_ids)
            if step + 1 == max_new_tokens or not bool(active.any()):
                break
            token_embeds = embed(tokens.unsqueeze(1))
            segments = [Segment(token_embeds[b], state.positions(1, backbone.position_rows, device),
                                torch.full((1,), IGNORE_INDEX, device=device)) if active[b] else None
                        for b, state in enumerate(runner.states)]
            if self.measure:
                with capture_attention_rows(self.engine.recorder, backbone.attn_implementation):
                    rows = runner.run(segments, query=True, grad=False)
                for b in range(batch):
                    if active[b]:
                        self._add(b, rows[b])
            else:
                runner.run(segments, query=False, grad=False)
            hidden = torch.stack([runner.last_hidden(b) for b in range(batch)])
            tokens = pick(backbone.logits(hidden.unsqueeze(1))[:, -1].float())
        sequences = out[:, : int(lengths.max()) if batch else 0]
        attention = self.mass / self.counted.clamp_min(1).unsqueeze(1) if self.measure else None
        return sequences, lengths, attention
