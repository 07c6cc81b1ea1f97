"""Dev: int4 decode of presets (argv) compiled, with a per-kernel profile of a few steps ($OUT/TAG_preset.txt)."""
import json, os, sys, time
from pathlib import Path
import torch
from hyperloop.config import get_preset
from hyperloop.infer.bench import build_model, time_decoder
from hyperloop.quant.quantize import quantize_rtn

out, tag = Path(os.environ.get("OUT", ".")), os.environ.get("TAG", "run")
for preset in sys.argv[1:]:
    model = build_model(get_preset(preset), torch.device("cuda"), torch.bfloat16, int4=False)
    quantize_rtn(model, bits=4, group_size=128)
    for compile_ in [c == "1" for c in os.environ.get("COMPILE", "0,1").split(",")]:
        t0 = time.time()
        r = time_decoder(model, 1, 128, 128, compile=compile_, profile=out / f"{tag}_{preset}_c{int(compile_)}.txt")
        print(dict(tag=tag, preset=preset, compile=compile_, tok_s=round(r["decode_tok_s"], 1), wall_s=round(time.time() - t0)), flush=True)
    del model
