"""Times public calls of fastppo (GAE, the loss, the heads, the RLHF kernels, the env boundary, the fused
update) and prints medians in microseconds as JSON: run it against two trees to compare them
(benchmarks/results/reshape_check_cpu.md)."""
import json
import time

import numpy as np, torch
import fastppo, fastppo.rlhf as rl
from fastppo.envstep import EnvBoundary
torch.set_num_threads(2)
def med(fn, n=None, budget=0.4):
    fn(); ts=[]; t_end=time.perf_counter()+budget
    while time.perf_counter()<t_end or len(ts)<5:
        t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
    return float(np.median(ts))*1e6
g=torch.Generator().manual_seed(0)
res={}
for T,N in [(128,8),(2048,1),(1024,4096)]:
    r=torch.randn(T,N,generator=g); v=torch.randn(T,N,generator=g); d=torch.rand(T,N,generator=g)<0.05; lv=torch.zeros(N)
    res[f"gae {T}x{N}"]=med(lambda: fastppo.gae(r,v,d,lv))
    rn, vn, dn, lvn = r.numpy(), v.numpy(), d.numpy(), lv.numpy()
    res[f"gae numpy {T}x{N}"]=med(lambda: fastppo.gae(rn,vn,dn,lvn))
for B in [128, 4096, 1048576]:
    nl=(torch.randn(B,generator=g)-1).requires_grad_(); ol=torch.randn(B,generator=g)-1; a=torch.randn(B,generator=g)
    nv=torch.randn(B,generator=g).requires_grad_(); ov=torch.randn(B,generator=g); rt=torch.randn(B,generator=g); en=torch.rand(B,generator=g).requires_grad_()
    def f():
        out=fastppo.ppo_loss(nl,ol,a,nv,ov,rt,en,ent_coef=0.01); out.loss.backward()
    res[f"ppo_loss fwd+bwd {B}"]=med(f)
for R,A in [(4096,6),(2048,32000)]:
    lg=torch.randn(R,A,generator=g).requires_grad_(); act=torch.randint(0,A,(R,),generator=g)
    def f():
        lp,e=fastppo.categorical_logprob_entropy(lg,act); (lp.sum()+e.sum()).backward()
    res[f"categorical fwd+bwd {R}x{A}"]=med(f, budget=1.0)
mu=torch.randn(4096,6,generator=g).requires_grad_(); ls=torch.zeros(6).requires_grad_(); ac=torch.randn(4096,6,generator=g)
def f():
    lp,e=fastppo.normal_logprob_entropy(mu,ls,ac); (lp.sum()+e.sum()).backward()
res["normal fwd+bwd 4096x6"]=med(f)
B_,T_=512,2048
lp=torch.randn(B_,T_,generator=g); rf=torch.randn(B_,T_,generator=g); m=torch.rand(B_,T_,generator=g)<0.8; sc=torch.randn(B_,generator=g)
res["kl_penalty_rewards 512x2048"]=med(lambda: rl.kl_penalty_rewards(lp,rf,m,sc,beta=0.05))
res["masked_whiten 512x2048"]=med(lambda: rl.masked_whiten(lp,m))
last=torch.full((B_,),T_-1); 
res["token_gae 512x2048"]=med(lambda: rl.token_gae(lp,rf,last))
# env boundary
b=EnvBoundary(4,(4,),normalize_obs=True,normalize_reward=True)
obs=np.random.rand(4,4).astype(np.float32); rew=np.random.rand(4).astype(np.float32); z=np.zeros(4,bool)
outs=[np.zeros((4,4),np.float32),np.zeros(4,np.float32)]+[np.zeros(4,np.bool_) for _ in range(3)]
res["EnvBoundary.step 4x4"]=med(lambda: b.step(obs,rew,z,z,*outs))
# fused update (CleanRL CartPole agent)
from fastppo.train import Agent
class Sp: n=2; shape=()
torch.manual_seed(0); ag=Agent((4,),Sp(),"classic")
from fastppo.policy import FusedActorCritic
fu=FusedActorCritic(ag, lr=2.5e-4, eps=1e-5)
n=512
fu.set_batch(torch.randn(n,4),torch.randint(0,2,(n,)),-torch.rand(n),torch.randn(n),torch.randn(n),torch.randn(n),torch.ones(n,dtype=torch.bool))
idx=torch.randperm(n)[:128].contiguous()
res["fused update 128"]=med(lambda: fu.update(idx))
print(json.dumps(res))
