"""A/B in one process: int4 decode tok/s (compiled) with gemv.cu as it is and with the site-fold hooks
stripped from the GEMV kernel (same signatures), for presets in argv."""
import json, os, sys
import torch
from torch.utils import cpp_extension
from hyperloop.config import get_preset
from hyperloop.infer.bench import build_model, time_decoder
from hyperloop.quant import gemv
from hyperloop.quant.quantize import quantize_rtn

captured = {}
orig = cpp_extension.load_inline
def spy(name, decl, **kw):
    captured.update(decl=decl, kw=kw)
    return orig(name, decl, **kw)
cpp_extension.load_inline = spy
real = gemv.extension()
cpp_extension.load_inline = orig
STRIP = [("  if (p.site.write) fold_write_early(p, fold, col0, cols);\n", ""),
         ("  if (p.site.read) fold_read_gates(p, fold);\n", ""),
         ("  if (p.site.write) fold_write(p, fold, col0, cols);\n", ""),
         ("  if (p.site.read)\n    fold_x_word(p, fold, j, v);\n  else\n    bf16x8_to_float(p.x[j], v);", "  bf16x8_to_float(p.x[j], v);")]
srcs = []
for s in captured["kw"]["cuda_sources"]:
    for a, b in STRIP:
        s = s.replace(a, b)
    srcs.append(s)
assert sum(s.count("fold_write_early(p, fold") for s in srcs) == 0
kw = dict(captured["kw"], cuda_sources=srcs)
stripped = orig("v_stripped", captured["decl"], **kw)
rows = []
for preset in sys.argv[1:]:
    model = build_model(get_preset(preset), torch.device("cuda"), torch.bfloat16, int4=False)
    quantize_rtn(model, bits=4, group_size=128)
    for rep in range(2):
        for name, ext in (("hooks", real), ("stripped", stripped)):
            gemv.extension = lambda ext=ext: ext
            r = time_decoder(model, 1, 128, 128, compile=True)
            row = dict(preset=preset, gemv=name, rep=rep, tok_s=round(r["decode_tok_s"], 1))
            print(row, flush=True)
            rows.append(row)
    del model
json.dump(rows, open(os.environ.get("OUT", ".") + "/fold_ab.json", "w"), indent=1)
