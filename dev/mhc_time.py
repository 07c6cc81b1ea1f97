"""Dev timing: decode tok/s of presets (argv) bf16 and int4, compiled or not (COMPILE), with wall times."""
import json, os, sys, time
import torch
from hyperloop.config import get_preset
from hyperloop.infer.bench import build_model, time_decoder
from hyperloop.quant.quantize import quantize_rtn

rows = []
modes = os.environ.get("MODES", "bf16,int4").split(",")
compile_ = os.environ.get("COMPILE", "1") == "1"
for preset in sys.argv[1:]:
    model = build_model(get_preset(preset), torch.device("cuda"), torch.bfloat16, int4=False)
    for mode in modes:
        if mode.startswith("int4") and not any(r.get("q") for r in rows if r["preset"] == preset):
            quantize_rtn(model, bits=4, group_size=128)
            rows.append(dict(preset=preset, q=True))
        t0 = time.time()
        r = time_decoder(model, 1, 128, 128, compile=compile_, fuse_int4=mode != "int4-op")
        row = dict(preset=preset, mode=mode, compile=compile_, tok_s=round(r["decode_tok_s"], 1), wall_s=round(time.time() - t0, 1))
        print(row, flush=True)
        rows.append(row)
    del model
json.dump(rows, open(os.environ.get("OUT", ".") + "/mhc_time.json", "w"), indent=1)
