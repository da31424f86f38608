"""The paper's method, baselines and ablations, defined once: what each mode trains on (the curriculum), which
engine options realise it, and whether it answers with latent steps (evaluation)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["ivtlr", "cot", "nocot", "latent_text_only", "latent_vision_only"]


@dataclass(frozen=True)
class ModeSpec:
    """One mode.

    ``curriculum``: ``latent`` (written steps progressively replaced by latent steps), ``written`` (the whole
    rationale, CoT) or ``answer`` (no rationale, No-CoT). ``engine_options``: the :class:`~ivtlr.method.engine.IVTLR`
    options that realise it.
    """

    name: Mode
    curriculum: Literal["latent", "written", "answer"]
    engine_options: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def latent(self) -> bool:
        """Whether the mode answers after latent steps."""
        return self.curriculum == "latent"


MODE_SPECS: dict[str, ModeSpec] = {spec.name: spec for spec in (
    ModeSpec("ivtlr", "latent", {}, "IVT-LR: latent text and latent vision"),
    ModeSpec("cot", "written", {}, "the written rationale, then the answer"),
    ModeSpec("nocot", "answer", {}, "the answer alone"),
    ModeSpec("latent_text_only", "latent", {"num_selected_patches": 0}, "Coconut: fed-back hidden states, no patches"),
    ModeSpec("latent_vision_only", "latent", {"latent_text": False}, "inserted patches, the latent token's own "
                                                                      "embedding in each slot"),
)}
MODES: tuple[str, ...] = tuple(MODE_SPECS)
LATENT_MODES: tuple[str, ...] = tuple(name for name, spec in MODE_SPECS.items() if spec.latent)
NO_LATENT_MODES: tuple[str, ...] = tuple(name for name, spec in MODE_SPECS.items() if not spec.latent)


def mode_spec(mode: str) -> ModeSpec:
    if mode not in MODE_SPECS:
        raise ValueError(f"unknown mode {mode!r}: use one of {MODES}")
    return MODE_SPECS[mode]
