"""Random-weight checkpoints the tool builds itself, for machines without a model hub.

A `random:<preset>` path in models.yaml names one of PRESETS. The first use builds a
Llama-family model from a transformers config with seeded random weights, plus a
byte-level BPE tokenizer trained offline on the built-in prompts, and writes both with
`save_pretrained` into the cache. From then on it is loaded through the very same
`from_pretrained` code as a hub model. Builds are atomic (temp dir + rename), so
concurrent workers on one host never see a half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from sweep.presets import PRESETS, RANDOM_PREFIX, Preset, cache_root  # noqa: F401  (importers use them here too)
from sweep.prompts import builtin_prompts

_RECIPE_VERSION = 1

# A generic chat template, so the tokenizer-template path (models FastChat does not know)
# can be exercised offline too.
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def is_random(path: str) -> bool:
    return path.startswith(RANDOM_PREFIX)


def _corpus() -> list[str]:
    texts = [p.text for p in builtin_prompts()]
    # Role words and separators of common chat templates, so prompts tokenize compactly.
    texts += ["USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>> <|system|> <|user|> <|assistant|> ### Human: Assistant:"]
    return texts


def _train_tokenizer(target_vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=target_vocab,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    size = tok.get_vocab_size()
    if size < target_vocab:
        # Pad with plain-letter tokens: never produced by encoding, but decodable, so a
        # random model sampling any id of its embedding still yields text.
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        for i in range(size, target_vocab):
            vocab[f"pad{i}"] = i
        tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        chat_template=_CHAT_TEMPLATE,
        model_max_length=4096,
    )


def _recipe_id(name: str, preset: Preset, seed: int) -> str:
    blob = json.dumps({"v": _RECIPE_VERSION, "name": name, "preset": asdict(preset), "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def ensure_random_checkpoint(path: str, seed: int = 0) -> Path:
    """Return the directory of the checkpoint for `random:<preset>`, building it if absent."""
    name = path[len(RANDOM_PREFIX):]
    preset = PRESETS[name]
    target = cache_root() / "models" / f"{name}-{_recipe_id(name, preset, seed)}"
    if (target / "config.json").is_file():
        return target

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tokenizer = _train_tokenizer(preset.vocab_size or 2048)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=preset.hidden_size,
            intermediate_size=preset.intermediate_size,
            num_hidden_layers=preset.num_hidden_layers,
            num_attention_heads=preset.num_attention_heads,
            num_key_value_heads=preset.num_key_value_heads,
            max_position_embeddings=preset.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        # Initialised where it will run: a 7B model never has to fit in host memory twice.
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to another builder: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
