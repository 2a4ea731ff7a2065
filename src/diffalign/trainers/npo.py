"""Diffusion-NPO (Wang et al. 2025, "Diffusion-NPO: Negative Preference Optimization for Better Preference Aligned
Generation of Diffusion Models", ICLR): Diffusion-DPO on REVERSED pairs.

The dispreferred image of every pair takes the winner slot, so the trained offset δ (a LoRA over the base) makes the
model PREFER what people dislike. δ is not used on its own: at sampling time it goes into the unconditional branch of
classifier-free guidance (`diffalign.guidance.attach_negative_adapter`), so guidance pushes away from it.

Everything else — data layer, shared t and ε within a pair, the loss `objectives.dpo_loss`, the loop, the outputs —
is DPO's. With policy == reference the loss is log 2 exactly as for DPO; for the same weights, NPO's margin is the
negative of DPO's on the same pairs.
"""

from __future__ import annotations

from pydantic import Field

from diffalign.trainers.dpo import DPOConfig, DPOTrainer


class NPOConfig(DPOConfig):
    """Diffusion-NPO: DPO on reversed pairs, producing a negative LoRA offset δ.

    Released recipe (SD1.5): LoRA rank 8, β = 500, lr 5e-6 constant, batch 64, 2000 steps. β convention here is
    the official DPO one (with the ½, see `objectives.dpo_loss`). The two released scripts differ: the SD1.5 one
    (`DPO-DPO-NPO/train_sd15.py`) computes `−logσ(β·((r_w − r_l) − (m_w − m_l)))` without the ½, so its β = 500 is
    **β = 1000** here; the SDXL one (`train_sdxl.py`) keeps `−½·β`, so its β = 2000 is **β = 2000** here.
    """

    beta: float = Field(
        1000.0, gt=0, description="β, official DPO convention (2 × the diffusers script's β; NPO SD1.5: 500 → 1000)."
    )
    lora_rank: int = Field(8, ge=0, description="LoRA rank of the negative offset δ (released recipe: 8).")
    learning_rate: float = Field(5e-6, gt=0, description="Released recipe: 5e-6, constant.")


class NPOTrainer(DPOTrainer):
    """Diffusion-DPO with winner and loser swapped at load time (`PreferencePairs(swap=True)`): the loser image is
    treated as preferred. Ties stay dropped. Outputs `final/pytorch_lora_weights.safetensors` = δ, which
    `diffalign.guidance.attach_negative_adapter` (or `diffalign generate --negative-adapter`) puts in the CFG
    unconditional branch."""

    method = "npo"
    config_class = NPOConfig
    swap_pairs = True

    def setup(self) -> None:
        super().setup()
        self.backbone.check_cfg_branch("`train npo` (δ is a negative adapter for the unconditional branch)")
