"""The peers' side of `bench/compare.py`, run in bench/.venv-peers (transformers 4, numpy 1).

Reads the shared inputs (model folder, GGUF, prompts, layer, strength, our vector), measures
repeng, steering-vectors and llama.cpp on them, and writes one JSON file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from timing import timed


def main() -> None:
    inputs = json.loads(Path(sys.argv[1]).read_text())
    out: dict = {}
    torch.set_num_threads(inputs["threads"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, layer, strength, n_new = inputs["folder"], inputs["layer"], inputs["strength"], inputs["new_tokens"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    harmful, safe = inputs["harmful_chat"], inputs["safe_chat"]
    ours = torch.tensor(inputs["our_vector"])
    prompt_ids = tokenizer(
        inputs["preview_chat"], return_tensors="pt", add_special_tokens=False, return_token_type_ids=False
    )

    def greedy():
        with torch.inference_mode():
            return model.generate(
                **prompt_ids,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )

    # --- steering-vectors: the same mean difference (mean of paired differences, last token) ---
    from steering_vectors import SteeringVector, mean_aggregator, train_steering_vector

    pairs = list(zip(safe, harmful, strict=True))  # (positive = safe, negative = harmful)
    timing, vector = timed(
        lambda: train_steering_vector(
            model,
            tokenizer,
            pairs,
            layers=list(range(inputs["n_layers"])),
            read_token_index=-1,
            aggregator=mean_aggregator(),
            show_progress=False,
        ),
        inputs["repeats"],
    )
    theirs = vector.layer_activations[layer].float()
    plain_timing, plain = timed(greedy, inputs["repeats"])
    ours_sv = SteeringVector(layer_activations={layer: ours}, layer_type="decoder_block")

    def steered_sv():
        with ours_sv.apply(model, multiplier=strength):
            return greedy()

    steered_timing, steered = timed(steered_sv, inputs["repeats"])
    out["steering_vectors"] = {
        "extraction_s": timing,
        "cosine_with_ours": float(torch.nn.functional.cosine_similarity(theirs, ours, dim=0)),
        "plain_generation_s": plain_timing,
        "steered_generation_s": steered_timing,
        "steered_text": tokenizer.decode(steered[0, prompt_ids["input_ids"].shape[1] :], skip_special_tokens=True),
        "plain_text": tokenizer.decode(plain[0, prompt_ids["input_ids"].shape[1] :], skip_special_tokens=True),
    }

    # --- repeng: its own method (PCA of paired differences), all layers ---
    from repeng import ControlModel, ControlVector, DatasetEntry

    control = ControlModel(model, list(range(1, inputs["n_layers"])))
    dataset = [DatasetEntry(positive=s, negative=h) for s, h in pairs]
    timing, rep_vector = timed(
        lambda: ControlVector.train(control, tokenizer, dataset, method="pca_diff", batch_size=16), inputs["repeats"]
    )
    direction = torch.tensor(rep_vector.directions[layer]).float()
    control.unwrap()
    control = ControlModel(model, [layer])  # steer one layer, as the others do
    control.set_control(ControlVector(model_type="llama", directions={layer: ours.numpy()}), coeff=strength)
    rep_steered_timing, _ = timed(
        lambda: control.generate(
            **prompt_ids,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        ),
        inputs["repeats"],
    )
    control.reset()
    out["repeng"] = {
        "extraction_s": timing,
        "method": "pca_diff (repeng has no plain mean difference)",
        "abs_cosine_with_ours": abs(float(torch.nn.functional.cosine_similarity(direction, ours, dim=0))),
        "steered_generation_s": rep_steered_timing,
    }
    control.unwrap()

    # --- llama.cpp through llama-cpp-python, with our exported control vector ---
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=inputs["gguf"], n_threads=inputs["threads"], n_ctx=1024, verbose=False, seed=0)

    def llama_generate():
        result = llm.create_completion(inputs["preview_chat"], max_tokens=n_new, temperature=0.0, top_k=1)
        return result["choices"][0]["text"], result["usage"]["completion_tokens"]

    llama_generate()
    plain_cpp, (text_plain, tokens_plain) = timed(llama_generate, inputs["repeats"])
    from gguf import GGUFReader

    reader = GGUFReader(inputs["control_vector"])
    n_embd, n_layer = inputs["hidden_size"], inputs["n_layers"]
    buffer = np.zeros(n_embd * n_layer, dtype=np.float32)  # slot i-1 holds layer i; layer 0 has none
    for tensor in reader.tensors:
        index = int(tensor.name.split(".")[1])
        buffer[(index - 1) * n_embd : index * n_embd] = np.array(tensor.data, dtype=np.float32)
    pointer = buffer.ctypes.data_as(llama_cpp.ctypes.POINTER(llama_cpp.ctypes.c_float))
    status = llama_cpp.llama_apply_adapter_cvec(llm.ctx, pointer, buffer.size, n_embd, 1, n_layer)
    steered_cpp, (text_steered, tokens_steered) = timed(llama_generate, inputs["repeats"])
    out["llama_cpp"] = {
        "plain_generation_s": plain_cpp,
        "steered_generation_s": steered_cpp,
        "tokens": [tokens_plain, tokens_steered],
        "control_vector_applied": status == 0,
        "plain_text": text_plain,
        "steered_text": text_steered,
    }
    Path(sys.argv[2]).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
