"""Parallel training, applied to a built model from outside (the model code knows nothing of it): torch.distributed
with torchrun's environment, FSDP2, expert parallelism. docs/distributed.md is the user's guide.

    world.py    World: this process's rank, the process group (gloo on CPU, nccl on CUDA), the device mesh
    apply.py    parallelize(model, world): expert parallelism, the data-parallel Sinkhorn, FSDP2; clip_grad_norm
    expert.py   the token exchange of expert parallelism (all_to_all_single), global expert names
    plan.py     memory and bytes moved per rank, before launching (``blackmamba info --world-size``)
"""
