"""``IVTLR``: a transformers VLM that reasons with interleaved latent text and latent vision.

The computation (docs/design.md): for each latent step the last-layer hidden state of the position before the
latent slot becomes the slot's input (latent text), and the K image-token embeddings that position attends to most
(averaged over layers and heads, earlier choices excluded) are inserted just before it (latent vision). This module
computes it with a key/value cache: the prompt once, then only the K+1 new rows per step (``ivtlr.method.chain``).
``recompute=True`` selects the original's algorithm instead (``ivtlr.method.recompute``), the reference the tests
hold the cached path to.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ivtlr.method.attention_rows import ROW_KERNEL_PREFIX, AttentionRowRecorder, attach_recorder, register_row_kernel
from ivtlr.backbones import Backbone, get_backbone
from ivtlr.method.chain import IGNORE_INDEX, ChainRunner, SampleState, Segment
from ivtlr.method.interventions import NO_INTERVENTION, LatentIntervention
from ivtlr.method.live import LiveBatch
from ivtlr.method.layout import Layout, SegmentBuilder, fed_latents
from ivtlr.method.outputs import GenerationOutput, IVTLROutput
from ivtlr.method.recompute import recompute_forward
from ivtlr.method.sampling import TokenPicker
from ivtlr.method.selection import PATCH_ORDERS
from ivtlr.method.supervision import LatentSupervision

logger = logging.getLogger(__name__)

LATENT_GRAD_MODES = ("detach", "full")
POSITION_MODES = ("original", "mrope")


class IVTLR(nn.Module):
    """Wraps a (bare or PEFT-wrapped) transformers VLM of any supported family (``ivtlr.backbones``).

    Args:
        model: the vision-language model.
        latent_token_id: id of ``<|latent|>``; its positions in ``input_ids`` are the latent slots.
        num_selected_patches: K, patches inserted per step (default: the family's, e.g. 32 for Qwen2-VL).
        latent_grad: ``detach`` (the original: no gradient through fed-back hidden states) or ``full`` (Coconut).
        positions: ``original`` (a 1-D range, as the released checkpoints were trained) or ``mrope`` (families with
            multimodal rotary positions: the native ones for the prompt, sequential after it).
        patch_order: insertion order of the chosen patches: ``position``, ``score`` or ``topk`` (see
            :func:`ivtlr.method.selection.select_patches`).
        recompute: run the original's algorithm (re-run the prefix at every step, eager attention maps).
        latent_text: feed the hidden state back into each latent slot (IVT-LR). ``False`` keeps the
            ``<|latent|>`` token's own embedding there: the "latent vision only" ablation. ``num_selected_patches=0``
            is the other ablation, latent text only (Coconut).
        vision_bottleneck: rows after the prompt do not attend to the prompt's image rows, only to the patches the
            latent steps insert (the first latent state still reads the whole picture; the patch ranking still
            scores every image row). Off by default, as in the paper; cached chain only (sdpa or eager attention).
    """

    def __init__(self, model: nn.Module, latent_token_id: int, *, num_selected_patches: int | None = None,
                 latent_grad: str = "detach", positions: str = "original", patch_order: str = "position",
                 recompute: bool = False, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, start_latent_id: int | None = None,
                 end_latent_id: int | None = None, latent_text: bool = True, vision_bottleneck: bool = False):
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
            raise ValueError("positions='mrope' needs a family with multimodal rotary positions")
        self.latent_token_id = int(latent_token_id)
        self.start_latent_id, self.end_latent_id = start_latent_id, end_latent_id
        k = self.backbone.default_num_selected_patches if num_selected_patches is None else num_selected_patches
        if k < 0:
            raise ValueError(f"num_selected_patches must be >= 0, got {k}")
        self.num_selected_patches = int(k)
        self.latent_grad, self.positions, self.patch_order = latent_grad, positions, patch_order
        self.recompute, self.latent_text = recompute, latent_text
        self.vision_bottleneck = bool(vision_bottleneck)
        if self.vision_bottleneck and "flash" in self.backbone.attn_implementation:
            raise ValueError("the vision bottleneck masks keys per query row, which flash attention kernels cannot "
                             "take: load the model with attn_implementation='sdpa' or 'eager'")
        eos = eos_token_id if eos_token_id is not None else self.backbone.eos_token_id
        self.eos_token_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self.pad_token_id = pad_token_id if pad_token_id is not None else \
            getattr(self.backbone.text_config, "pad_token_id", None) or min(self.eos_token_ids, default=0)
        self.recorder = AttentionRowRecorder(self.backbone.attention_modules())
        attach_recorder(self.recorder, self.backbone.attention_modules())
        self.prepare_row_kernel()
        self.builder = SegmentBuilder(self.backbone, latent_token_id=self.latent_token_id,
                                      num_selected_patches=self.num_selected_patches, patch_order=patch_order,
                                      latent_text=latent_text, latent_grad=latent_grad, positions=positions,
                                      pad_token_id=self.pad_token_id)

    # ------------------------------------------------------------------------------------------ public API
    @classmethod
    def from_original(cls, base_model_dir, state_dict_path, num_selected_patches: int | None = None, **kwargs):
        """Load a checkpoint in the original IVT-LR release format; see :func:`ivtlr.original.load_original`."""
        from ivtlr.original import load_original

        return load_original(cls, base_model_dir, state_dict_path, num_selected_patches=num_selected_patches,
                             **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, intervention: LatentIntervention | None = None,
                step_targets: torch.Tensor | None = None, step_regions: torch.Tensor | None = None,
                **vision_inputs: torch.Tensor | None) -> IVTLROutput:
        """The final sequences' logits (and loss, with ``labels``).

        ``vision_inputs``: whatever the family's processor returned beside the ids and the mask (``pixel_values``,
        ``image_grid_thw``, ``image_sizes``, ...), handed to the backbone as they are. ``intervention`` replaces what
        the latent steps feed back or insert (:mod:`ivtlr.method.interventions`; off by default). ``step_targets`` and
        ``step_regions`` (:class:`~ivtlr.method.supervision.LatentSupervision`, written by the collator when step or
        region supervision is on) add the step and region losses to the output; the loss itself is unchanged."""
        vision = _vision(vision_inputs)
        intervention = intervention or NO_INTERVENTION
        supervision = LatentSupervision(step_targets, step_regions)
        supervision = supervision if supervision.active else None
        if self.recompute and not intervention.is_identity:
            raise ValueError("interventions run on the cached chain; build the engine with recompute=False")
        if self.recompute and self.vision_bottleneck:
            raise ValueError("the vision bottleneck runs on the cached chain; build the engine with recompute=False")
        if self.recompute:
            return recompute_forward(self.backbone, self.builder, input_ids, attention_mask, labels, vision,
                                     supervision)
        layouts = self.builder.layouts(input_ids, attention_mask, labels, vision, supervision)
        grad = torch.is_grad_enabled()
        checkpointing = grad and self._gradient_checkpointing_active()
        # Gradient checkpointing cannot keep a cache inside the autograd graph. With detached latents only the final
        # pass needs gradients, so the chain runs cached without them and the final sequence once with them; with
        # `full`, or when supervision losses train the chain's own passes, every pass is re-run over its whole
        # prefix, as Coconut does.
        chain_trained = self.latent_grad == "full" or supervision is not None
        cached = not (checkpointing and chain_trained)
        chain_grad = grad and not (checkpointing and not chain_trained)
        defer_final = grad and not chain_grad
        intervention.check_batch(len(layouts))
        self.recorder.differentiable = supervision is not None and supervision.step_regions is not None
        try:
            runner, selected = self._run_chain(layouts, vision, cached=cached, grad=chain_grad,
                                               defer_final=defer_final, intervention=intervention)
        finally:
            self.recorder.differentiable = False
        if defer_final:
            final_pass = ChainRunner(self.backbone, self.recorder, runner.states, cached=False,
                                     dtype=runner.dtype, device=runner.device,
                                     vision_bottleneck=self.vision_bottleneck)
            final_pass.run([None] * len(layouts), query=False, grad=True)
        return self.builder.assemble(runner.states, selected, labels is not None,
                                     layouts if supervision is not None else None)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 64, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
                 return_dict: bool = False, intervention: LatentIntervention | None = None,
                 measure_attention: bool = False, return_log_probs: bool = False, suppress_tokens: Sequence[int] = (),
                 **vision_inputs: torch.Tensor | None) -> torch.Tensor | GenerationOutput:
        """Decode after the latent chain, batched, continuing from the chain's own cache.

        ``input_ids`` hold the prompt with its ``<|latent|>`` slots (any padding, marked by ``attention_mask``);
        ``vision_inputs`` are the processor's other outputs, as for :meth:`forward`. Greedy by default;
        ``do_sample`` draws with ``temperature`` / ``top_p`` / ``top_k`` from ``generator``.
        Each sample stops at its first EOS (the first generated token included) or after ``max_new_tokens``.
        ``intervention`` replaces what the latent steps feed back or insert (:mod:`ivtlr.method.interventions`; off by
        default); ``measure_attention`` also reports the attention the answer tokens pay to the latent and patch rows;
        ``return_log_probs`` each generated token's log-probability (``token_log_probs``); ``suppress_tokens`` are
        never generated (RL rollouts keep the latent control tokens out of answers).
        Returns the new ids, (B, T), padded with ``pad_token_id``.
        """
        (out,) = self.generate_variants(input_ids, attention_mask, interventions=[intervention or NO_INTERVENTION],
                                        max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                        pad_token_id=pad_token_id, do_sample=do_sample, temperature=temperature,
                                        top_p=top_p, top_k=top_k, generator=generator,
                                        measure_attention=measure_attention, return_log_probs=return_log_probs,
                                        suppress_tokens=suppress_tokens, **vision_inputs)
        return out if return_dict else out.sequences

    @torch.no_grad()
    def generate_variants(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                          interventions: Sequence[LatentIntervention], max_new_tokens: int = 64,
                          eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                          do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                          generator: torch.Generator | None = None, measure_attention: bool = False,
                          return_log_probs: bool = False, suppress_tokens: Sequence[int] = (),
                          **vision_inputs: torch.Tensor | None) -> list[GenerationOutput]:
        """:meth:`generate` once per intervention on the same batch, the prompt pass computed once and shared."""
        if self.recompute and any(not i.is_identity for i in interventions):
            raise ValueError("interventions run on the cached chain; build the engine with recompute=False")
        eos = self.eos_token_ids if eos_token_id is None else \
            set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        pad = self.pad_token_id if pad_token_id is None else pad_token_id
        vision = _vision(vision_inputs)
        layouts = self.builder.layouts(input_ids, attention_mask, None, vision)
        for intervention in interventions:
            intervention.check_batch(len(layouts))
        query = measure_attention or max(lay.n_latent for lay in layouts) > 0
        self.prepare_row_kernel()
        prefilled, rows = self._prefill(layouts, vision, cached=True, grad=False, query=query)
        outputs = []
        for i, intervention in enumerate(interventions):
            runner = prefilled.fork() if i < len(interventions) - 1 else prefilled
            selected, final_rows = self._latent_passes(layouts, runner, rows, grad=False,
                                                       intervention=intervention, query_last=measure_attention)
            pick = TokenPicker(do_sample, temperature, top_p, top_k, generator, suppress_tokens)
            decoder = _Decoder(self, runner, layouts, final_rows if measure_attention else None)
            sequences, lengths, attention, log_probs = decoder.run(pick, max_new_tokens, eos, pad, input_ids.device,
                                                                   return_log_probs)
            outputs.append(GenerationOutput(sequences=sequences, lengths=lengths, selected=selected,
                                            latents=[fed_latents(st) for st in runner.states],
                                            answer_attention=attention, token_log_probs=log_probs))
        return outputs

    @torch.no_grad()
    def image_token_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                               **vision_inputs: torch.Tensor | None) -> list[torch.Tensor]:
        """Per sample, (N, D): the image-token embeddings the latent vision inserts rows from (donor images)."""
        layouts = self.builder.layouts(input_ids, attention_mask, None, _vision(vision_inputs))
        return [lay.image_embeds for lay in layouts]

    def live_batch(self) -> LiveBatch:
        """An empty :class:`~ivtlr.method.live.LiveBatch` on this engine: requests join and leave between passes
        (continuous batching, as ``ivtlr serve`` runs it), each answered as :meth:`generate` answers it alone."""
        return LiveBatch(self)

    def image_grid(self, vision_inputs: Mapping[str, torch.Tensor | None], sample: int) -> tuple[int, int]:
        """(rows, cols) of a sample's image-token grid, what ``selected`` indices are laid out on, from the batch's
        vision inputs (the processor's outputs)."""
        return self.backbone.image_grid(_vision(vision_inputs), sample)

    # ------------------------------------------------------------------------------------------ internals
    def prepare_row_kernel(self) -> None:
        """Make the text decoder run its attention kernel through ivtlr's row-capturing function (the same kernel:
        outputs are unchanged). Checked before each chain, as the user may have switched the model's implementation
        since (``set_attn_implementation``)."""
        implementation = self.backbone.attn_implementation
        if not implementation.startswith(ROW_KERNEL_PREFIX):
            self.backbone.set_text_attention(register_row_kernel(implementation))

    def _gradient_checkpointing_active(self) -> bool:
        model = self.backbone.model
        flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
            else "is_gradient_checkpointing"
        return bool(getattr(model, flag, False)) and model.training

    def _run_chain(self, layouts: list[Layout], vision: Mapping[str, torch.Tensor], *, cached: bool, grad: bool,
                   defer_final: bool = False, intervention: LatentIntervention = NO_INTERVENTION):
        """Prompt pass, then one pass per latent step; returns the runner (segments and hidden states) and the
        selections. ``defer_final``: the caller re-runs the whole final sequence, so the last pass is skipped."""
        self.prepare_row_kernel()
        runner, rows = self._prefill(layouts, vision, cached=cached, grad=grad,
                                     query=max(lay.n_latent for lay in layouts) > 0)
        selected, _ = self._latent_passes(layouts, runner, rows, grad=grad, defer_final=defer_final,
                                          intervention=intervention)
        return runner, selected

    def _prefill(self, layouts: list[Layout], vision: Mapping[str, torch.Tensor], *, cached: bool, grad: bool,
                 query: bool):
        """The prompt pass; returns the runner and the attention rows of each prompt's last row (or None)."""
        prompts, next_start = self.builder.prompt_segments(layouts, vision)
        states = [SampleState(next_position=int(p)) for p in next_start]
        runner = ChainRunner(self.backbone, self.recorder, states, cached=cached, dtype=layouts[0].embeds.dtype,
                             device=layouts[0].ids.device, vision_bottleneck=self.vision_bottleneck)
        return runner, runner.run(prompts, query=query, grad=grad)

    def _latent_passes(self, layouts: list[Layout], runner: ChainRunner, rows: torch.Tensor | None, *, grad: bool,
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
        for step in range(1, n_max + 1):
            new: list[Segment | None] = []
            for b, lay in enumerate(layouts):
                if lay.n_latent < step:
                    new.append(None)
                    continue
                new.append(self.builder.latent_step_segment(lay, runner.states[b], runner.last_hidden(b), rows[b],
                                                            taken[b], selected[b], step, intervention, b))
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

def _vision(vision_inputs: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """The processor outputs the backbone reads, without the ones given as None."""
    return {key: value for key, value in vision_inputs.items() if value is not None}


class _Decoder:
    """Greedy or sampled decoding continuing a finished latent chain, batched; optionally measures the attention the
    answer tokens pay to the latent and inserted patch rows."""

    def __init__(self, engine: IVTLR, runner: ChainRunner, layouts: list[Layout],
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

    def run(self, pick: TokenPicker, max_new_tokens: int, eos: set[int], pad: int, device, log_probs: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        runner, batch = self.runner, len(self.layouts)
        backbone = self.engine.backbone
        hidden = torch.stack([runner.last_hidden(b) for b in range(batch)])
        logits = backbone.logits(hidden.unsqueeze(1))[:, -1].float()
        tokens = pick(logits)
        out = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
        scores = torch.zeros(batch, max_new_tokens, device=device) if log_probs else None
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        active = torch.ones(batch, dtype=torch.bool, device=device)
        embed = backbone.input_embeddings()
        eos_ids = torch.tensor(sorted(eos), device=device) if eos else None
        for step in range(max_new_tokens):
            out[active, step] = tokens[active]
            if scores is not None:
                scores[active, step] = pick.log_prob(logits, tokens)[active]
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
                rows = runner.run(segments, query=True, grad=False)
                for b in range(batch):
                    if active[b]:
                        self._add(b, rows[b])
            else:
                runner.run(segments, query=False, grad=False)
            hidden = torch.stack([runner.last_hidden(b) for b in range(batch)])
            logits = backbone.logits(hidden.unsqueeze(1))[:, -1].float()
            tokens = pick(logits)
        width = int(lengths.max()) if batch else 0
        attention = self.mass / self.counted.clamp_min(1).unsqueeze(1) if self.measure else None
        return out[:, :width], lengths, attention, scores[:, :width] if scores is not None else None
