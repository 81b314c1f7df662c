import sys, tempfile, time, torch, statistics
from pathlib import Path
from cfkit.perf.train_step import EngineStep, parser
args = parser().parse_args("--hidden 64 --depth 4 --heads 4 --batch 32 --latent 8 --patch 1 --device cpu --dtype fp32".split())
e = EngineStep(args, "causalfusion", 1, None, "fp32", torch.device("cpu"), Path(tempfile.mkdtemp()))
c = EngineStep(args, "causalfusion", 1, None, "fp32", torch.device("cpu"), Path(tempfile.mkdtemp()))
kw = dict(dynamic=True)
if len(sys.argv) > 1 and sys.argv[1] == "static": kw = dict(dynamic=False)
for b in c.model.blocks: b.compile(**kw)
t0=time.perf_counter()
for i in range(8): c(); e()
print("warm", time.perf_counter()-t0, flush=True)
r=[]
for i in range(30):
    a=time.perf_counter(); e(); b=time.perf_counter(); c(); d=time.perf_counter()
    r.append((b-a)/(d-b))
print("eager/compiled median", statistics.median(r), sorted(r)[7], sorted(r)[22])
