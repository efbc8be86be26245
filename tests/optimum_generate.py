"""Run in optimum's own environment (tests/optimum-env.txt) by test_runtimes.py: load an ONNX folder
with ORTModelForCausalLM, generate greedily, save the reply tokens and each step's logits (.npz)."""

import json
import sys

import numpy as np
import torch
from optimum.onnxruntime import ORTModelForCausalLM

folder, prompt_json, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
prompt = json.loads(prompt_json)
model = ORTModelForCausalLM.from_pretrained(folder)
x = torch.tensor([prompt])
gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, output_logits=True,
                     return_dict_in_generate=True)
np.savez(out, tokens=gen.sequences[0, len(prompt):].numpy(), logits=torch.cat(gen.logits).float().numpy())
