"""RL instruction tuning (PFIT's client step): GRPO from TRL against the client's reward mix.

Each round the client samples ``rl.num_generations`` completions per prompt from its policy
(global LoRA from the server + its own local LoRA), scores them with every named reward,
mixes them with its preference weights (each reward z-scored over the batch first, see
clients/rewards.py), and takes ``client.max_steps`` GRPO steps: group-relative advantages,
clipped policy gradient, and a KL penalty (``rl.beta``) to the reference policy, which for a
PEFT model is the same network with the LoRA switched off. TRL does the policy optimisation;
this module only maps the config and the rewards onto it.
"""

from __future__ import annotations

import logging
import tempfile
import warnings

import torch

from fedllm.core.bundle import ModelBundle
from fedllm.core.types import Instruction

from .base import TRAINERS, TrainContext, TrainResult
from .rewards import build_rewards, mix, score_all

TRAINER_OPTIM = {"adamw": "adamw_torch", "sgd": "sgd"}  # client.optimizer as transformers' Trainer names it


def mixed_reward_fn(rewards: dict, weights: dict[str, float]):
    """A TRL reward function: the client's mix of batch-normalised rewards."""

    def client_reward(prompts, completions, reference, **_) -> list[float]:
        scores = score_all(rewards, prompts, [c.strip() for c in completions], reference)
        return mix(scores, weights, normalise=True)

    return client_reward


def _reference_is_the_base(model) -> None:
    """TRL copies the current LoRA into a frozen "ref" adapter as the KL reference, i.e. the
    policy at the start of this round. PFIT's reference is the instruction-tuned base policy
    every client started from, so the copy is zeroed (LoRA B = 0: the adapter adds nothing)."""
    for name, param in model.named_parameters():
        if ".ref." in name and "lora_B" in name:
            param.data.zero_()


@TRAINERS.register("rl")
def train_rl(bundle: ModelBundle, examples: list[Instruction], ctx: TrainContext) -> TrainResult:
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    rl, section = ctx.rl, ctx.section
    if rl is None or ctx.preference is None:
        raise ValueError("client.trainer 'rl' needs the rl: section and this client's preference")
    rewards = {name: fn for name, fn in build_rewards(rl.rewards).items() if name in ctx.preference}
    dataset = Dataset.from_dict({"prompt": [e.prompt for e in examples], "reference": [e.reference for e in examples]})
    with tempfile.TemporaryDirectory(prefix="fedllm-grpo-") as out:
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=section.batch_size, num_generations=rl.num_generations,
            max_completion_length=rl.max_new_tokens, temperature=rl.temperature, beta=rl.beta,
            learning_rate=section.lr, weight_decay=section.weight_decay, optim=TRAINER_OPTIM[section.optimizer],
            max_steps=section.max_steps,
            lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(), seed=ctx.seed, data_seed=ctx.seed,
            bf16=bundle.precision == "bf16", fp16=bundle.precision == "fp16",  # transformers' own autocast
            top_k=0,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("transformers").setLevel(logging.ERROR)
            trainer = GRPOTrainer(model=bundle.model, reward_funcs=[mixed_reward_fn(rewards, ctx.preference)],
                                  args=args, train_dataset=dataset, processing_class=bundle.tokenizer)
            trainer.remove_callback(PrinterCallback)  # transformers prints every log dict otherwise
            trainer.remove_callback(ProgressCallback)
            try:
                _reference_is_the_base(bundle.model)
                trainer.train()
            finally:
                if "ref" in bundle.model.peft_config:
                    bundle.model.delete_adapter("ref")
                    bundle.model.set_adapter("default")
    logs = [h for h in trainer.state.log_history if "loss" in h and "reward" in h]
    mean = lambda key: sum(float(h.get(key, 0.0)) for h in logs) / max(1, len(logs))  # noqa: E731
    bundle.model.eval()
    return TrainResult(loss=mean("loss"), steps=len(logs), examples_seen=len(logs) * section.batch_size,
                       extra={"kl": mean("kl"), "completion_length": mean("completions/mean_length")})
