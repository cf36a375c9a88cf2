import json
import os
import sys
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch


torch.set_num_threads(1)
sys.path.insert(0, "/work/main/benchmarks"); sys.path.insert(0, "/work/main")
from gmm import scatter_png

from diffusers_onestep import parameterization as P
from diffusers_onestep.distill.config import MethodConfig
from diffusers_onestep.testing.analytic import GaussianMixture
from diffusers_onestep.testing.toy import ToyModels, mixture_metrics, train_toy


FLOW = P.FlowPath()
T = GaussianMixture.grid25(std=0.2)
ref = T.sample(4000, generator=torch.Generator().manual_seed(10_000))

def ode_map(z, n=200):
    x = z.double().clone()
    ts = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
    def v(x, t):
        tt = torch.full((x.shape[0],), float(t), dtype=torch.float64)
        x0 = T.x0(x, tt, FLOW)
        return (x - x0) / max(float(t), 1e-6)
    for i in range(n):
        t0, t1 = ts[i], ts[i + 1]
        d0 = v(x, t0)
        xe = x + (t1 - t0) * d0
        if float(t1) > 0:
            x = x + (t1 - t0) * 0.5 * (d0 + v(xe, t1))
        else:
            x = xe
    return x

def regress(steps, hidden, depth, lr, seed=0, N=65536, beta1=0.0, decay=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, 2, generator=g, dtype=torch.float64)
    t0 = time.perf_counter()
    cache = f"/tmp/g25/ode_{seed}_{N}.pt"
    zt = torch.randn(4000, 2, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    if os.path.exists(cache):
        y, yt = torch.load(cache)
    else:
        y = ode_map(z); yt = ode_map(zt); torch.save((y, yt), cache)
    tode = time.perf_counter() - t0
    m_ode = mixture_metrics(T, yt, ref)
    models = ToyModels(T, FLOW, hidden=hidden, depth=depth, discriminator_trunk=None, seed=seed)
    opt = torch.optim.Adam(models.role_parameters("student"), lr=lr, betas=(beta1, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps) if decay else 1.0)
    tt = torch.ones(512, dtype=torch.float64)
    t0 = time.perf_counter()
    for s in range(steps):
        idx = torch.randint(0, N, (512,), generator=g)
        loss = ((models.student(z[idx].float(), tt, None) - y[idx].float()) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    with torch.no_grad():
        out = models.student(zt.float(), torch.ones(4000, dtype=torch.float64), None).double()
    m = mixture_metrics(T, out, ref)
    return {"kind": "ode_regress", "beta1": beta1, "decay": decay, "steps": steps, "hidden": hidden, "depth": depth, "lr": lr, "seed": seed, "modes": m["modes"], "hq": m["high_quality"],
                "energy": m["energy"], "ode_modes": m_ode["modes"], "ode_hq": m_ode["high_quality"], "mse": float(((out-yt)**2).mean()),
                "s": time.perf_counter() - t0, "ode_s": tode}, out

def distill(div, steps=2000, hidden=128, depth=3, lr=1e-3, ratio="learned", fake="learned", seed=0, k=1,
            critic_hidden=None, critic_depth=None, lr_decay=False, critic_lr=None, batch=512, beta1=0.0):
    cfg = MethodConfig(divergence=div, guidance_scale=1.0, critic_updates_per_student=k)
    r = train_toy(T, FLOW, cfg, student_steps=steps, batch_size=batch, lr=lr, hidden=hidden, depth=depth, ratio=ratio,
                  fake_score=fake, seed=seed, critic_hidden=critic_hidden, critic_depth=critic_depth, lr_decay=lr_decay,
                  critic_lr=critic_lr, betas=(beta1, 0.999), eval_every=max(steps // 4, 1))
    m = r.metrics
    return {"kind": "distill", "div": div, "steps": steps, "hidden": hidden, "depth": depth, "lr": lr, "ratio": ratio, "fake": fake, "seed": seed, "k": k,
                "critic_hidden": critic_hidden, "critic_depth": critic_depth, "lr_decay": lr_decay, "critic_lr": critic_lr, "batch": batch, "beta1": beta1,
                "modes": m["modes"], "lenient": m["modes_lenient"], "hq": m["high_quality"], "energy": m["energy"], "tv": m["mass_tv"],
                "s": r.seconds, "history": [(h["student_step"], h["modes"], round(h["high_quality"], 3)) for h in r.history]}, r.samples

if __name__ == "__main__":
    name = sys.argv[1]; kw = json.loads(sys.argv[2])
    fn = regress if kw.pop("fn") == "regress" else distill
    row, samples = fn(**kw)
    row["name"] = name
    scatter_png(samples[:4000], T, f"/tmp/g25/{name}.png", f"{name}: {row['modes']}/25")
    print(json.dumps(row), flush=True)
    with open("/tmp/g25/results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
