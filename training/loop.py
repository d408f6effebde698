"""The training loop's parts: a `TrainLoop` built from a resolved TrainConfig, run by train.py's train_ddpm.

    TrainLoop(config, dist, ckpt).run()
        __init__     the run's state: model, EMA copy, optimizer, data, logs (resumed from ckpt if given)
        run          Algorithm 1 of Ho et al. 2020 plus bookkeeping: batches -> run_step -> log_step,
                     checkpoints and sample grids at epoch ends, a clean stop on SIGINT/SIGTERM
        run_step     one optimizer step on the loss: noise from (seed, step), forward/backward over
                     micro-batches, gradient clipping, the NaN/inf skip, Adam, the EMA update;
                     with class_cond, labels dropped to the null class with probability p_uncond
        log_step     TensorBoard scalars and the progress line
        save         ddpm_latest.pth (and ddpm_epoch_N.pth), atomically, never NaN weights
        sample_grid  a fixed-seed grid from the EMA weights

Reproducibility: the data order and flips come from (seed, epoch), the t and eps of
every step from (seed, step) over the global batch (so do the dropped labels of a
class-conditional run, from a stream of their own), and dropout from (seed, step, rank),
so a resumed run continues exactly, and N ranks or accum_steps micro-batches see
exactly the batch one process would. With importance_sampling, t also depends on the loss
history (timestep_sampler.ImportanceSampler), which every rank holds whole and checkpoints carry.
"""

import copy
import json
import math
import os
import time
from contextlib import closing, nullcontext

import torch
import torch.distributed as torch_dist

from data.process_cifar import InMemoryLoader, load_dataset
from diffusion import create_cifar10_ddpm
from model.presets import model_kwargs
from runtime import GracefulStop, amp_dtype, autocast, environment_info, keep_freed_memory, use_channels_last
from sampling.guidance import drop_labels
from training.config import batch_split
from training.reports import evaluate_fid, sample_grid
from training.timestep_sampler import ImportanceSampler, step_noise, stream_seed
from weights.checkpoint import load_model_state, save_checkpoint

MAX_BAD_STEPS = 5  # consecutive non-finite steps before training stops


@torch.no_grad()
def ema_update(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * params, in one fused op over all tensors."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def ema_decay_at(step, ema_decay):
    """The EMA decay after `step` updates: ramps up early so short runs' EMA is not stuck at the init.

    min(ema_decay, (1 + step) / (10 + step)) reaches 0.9999 after ~90k steps, so
    long runs match the paper's constant decay.
    """
    return min(ema_decay, (1.0 + step) / (10.0 + step))


def check_classes(config, classes, resumed_classes=None):
    """A class-conditional run's class names; a resumed run's must be the data's."""
    if resumed_classes is not None and list(resumed_classes) != list(classes):
        raise ValueError(f'the resumed run was trained on the classes {list(resumed_classes)}, but '
                         f'{config.data_dir} has {classes}; resume it on the same dataset')
    if len(classes) < 2:
        raise ValueError(f'class_cond needs at least two classes, {config.data_dir} has {classes}')
    return list(classes)


def run_record(config, class_names=None):
    """What config.json and every checkpoint store: the options as plain types, plus the data's classes
    for a class-conditional run (so a checkpoint alone rebuilds its model)."""
    record = config.to_dict()
    if class_names is not None:
        record.update(num_classes=len(class_names), class_names=list(class_names))
    return record


class TrainLoop:
    """One training run; see the module docstring for the parts."""

    def __init__(self, config, dist, ckpt=None, resume_path=None):
        from tqdm.auto import tqdm
        self.c, self.dist, self.device = config, dist, dist.device   # the config is read, never written
        self.is_main = dist.is_main
        c = config
        self.per_rank, self.micro = batch_split(c, dist.world_size)
        # The run's state beside its config: a class-conditional model's classes come from the data.
        resumed_classes = (ckpt.get('config') or {}).get('class_names') if ckpt is not None else None
        self.class_names = self._load_data(resumed_classes)
        self.num_classes = len(self.class_names) if self.class_names is not None else None
        self.plain_config = run_record(c, self.class_names)
        self._build_model(ckpt, resume_path)
        self.steps_per_epoch = len(self.loader)
        self.total_steps = self.steps_per_epoch * c.num_epochs
        if c.max_steps is not None:
            self.total_steps = min(self.total_steps, c.max_steps)
        self.step = int(ckpt['step']) if ckpt is not None else 0
        self.nan_skipped = int(ckpt.get('nan_skipped', 0)) if ckpt is not None else 0
        self.scale_skipped = int(ckpt.get('scale_skipped', 0)) if ckpt is not None else 0
        self.bad_in_a_row, self.stop_reason, self.stop, self.stop_agreed = 0, None, None, False
        self.grid_made_at = None
        self.latest_path = os.path.join(c.checkpoint_dir, 'ddpm_latest.pth')
        self.noise_generator = torch.Generator(device=self.device)
        self.t_sampler = ImportanceSampler(c.timesteps) if c.importance_sampling else None
        if self.t_sampler is not None and ckpt is not None and ckpt.get('timestep_sampler') is not None:
            self.t_sampler.load_state_dict(ckpt['timestep_sampler'])
        self.cond_generator = torch.Generator(device=self.device) if c.class_cond else None
        self.log_t, self.log_images, self.loss_sum, self.loss_count = time.perf_counter(), 0, 0.0, 0
        self._open_logs()
        self._start_fid()
        if ckpt is not None:
            self.say(f'resumed from {resume_path} at step {self.step} (epoch {self.step // self.steps_per_epoch})')
        self.bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.is_main, dynamic_ncols=True,
                        unit='step')

    def say(self, msg):
        if self.is_main:
            from tqdm.auto import tqdm
            tqdm.write(msg)

    # ----- building the run's state ---------------------------------------------------------

    def _build_model(self, ckpt, resume_path):
        """Model, EMA copy and Adam; the same seed gives every rank the same initial weights."""
        c, device = self.c, self.device
        torch.manual_seed(c.seed)
        self.raw_model = create_cifar10_ddpm(**model_kwargs(self.plain_config)).to(device)  # as from_checkpoint
        if ckpt is not None:
            load_model_state(self.raw_model, ckpt['model_state_dict'], source=resume_path)
        self.ema_model = copy.deepcopy(self.raw_model).requires_grad_(False).eval()
        if ckpt is not None and ckpt.get('ema_state_dict') is not None:
            load_model_state(self.ema_model, ckpt['ema_state_dict'], source=resume_path)
        self.autocast_dtype = amp_dtype(c.amp, device)
        self.channels_last = use_channels_last(c.channels_last, device, self.autocast_dtype)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        if device.type == 'cpu':
            keep_freed_memory()
        if device.type == 'cuda':
            torch.backends.cudnn.benchmark = True          # fixed shapes: pick the fastest conv algorithms once
            torch.backends.cuda.matmul.allow_tf32 = True   # fp32 matmuls/convs on tensor cores (amp='fp32' runs)
            torch.backends.cudnn.allow_tf32 = True
        self.raw_model.to(memory_format=self.memory_format)
        self.ema_model.to(memory_format=self.memory_format)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.ema_params = list(self.ema_model.parameters())
        adam_kwargs = {'fused': True} if device.type in ('cuda', 'cpu') else {'foreach': True}
        self.optimizer = torch.optim.Adam(self.params, lr=c.lr, **adam_kwargs)
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt['optimizer_state_dict'])
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)
        if ckpt is not None and ckpt.get('scaler_state_dict'):
            self.scaler.load_state_dict(ckpt['scaler_state_dict'])
        self.train_module = self.raw_model
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.train_module = DistributedDataParallel(
                self.raw_model, device_ids=[device.index] if device.type == 'cuda' else None)
        if c.compile:
            self.train_module = torch.compile(self.train_module)

    def _load_data(self, resumed_classes=None):
        """The whole set as uint8 on the device, batches sliced from it; returns the class names (class_cond) or None.

        Ranks load in turns so that a CIFAR-10 download or a folder's decode cache is
        written once, never by two processes at a time: rank 0 first, then the first
        process of every other node (for nodes that do not share rank 0's disk), then
        the rest, who find the files in place.
        """
        c, dist = self.c, self.dist
        turn = 0 if dist.rank == 0 else 1 if dist.local_rank == 0 else 2
        labels = None
        for t in range(3 if dist.world_size > 1 else 1):
            if t == turn:
                data = load_dataset(c.dataset, c.data_dir, image_size=c.image_size, train=True,
                                    labels=c.class_cond)
                self.images, labels, classes = data if c.class_cond else (data, None, None)
            dist.barrier()
        class_names = check_classes(c, classes, resumed_classes) if c.class_cond else None
        self.loader = InMemoryLoader(self.images, c.batch_size, seed=c.seed, rank=dist.rank,
                                     world_size=dist.world_size, device=self.device, labels=labels)
        return class_names

    def _open_logs(self):
        """config.json and TensorBoard under log_dir/run_name (rank 0), and the run's opening lines."""
        from torch.utils.tensorboard import SummaryWriter
        c = self.c
        self.env = environment_info()
        self.run_dir = os.path.join(c.log_dir, c.run_name)
        self.writer = None
        if not self.is_main:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        os.makedirs(c.checkpoint_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, 'config.json'), 'w') as f:
            json.dump({'config': self.plain_config, 'environment': self.env, 'world_size': self.dist.world_size},
                      f, indent=2)
        self.writer = SummaryWriter(self.run_dir, purge_step=self.step if self.step > 0 else None)
        self.writer.add_text('config', '\n'.join(f'    {k}: {v!r}' for k, v in {**self.plain_config,
                                                                           **self.env}.items()), self.step)
        self.say('config: ' + json.dumps(self.plain_config))
        self.say(f'{len(self.images)} training images, {self.steps_per_epoch} steps/epoch, global batch '
                 f'{c.batch_size} = {self.dist.world_size} rank(s) x {c.accum_steps} micro-batch(es) x '
                 f'{self.micro} images; device {self.device}, amp {self.autocast_dtype or "fp32"}, '
                 f'{"channels_last" if self.channels_last else "NCHW"}, '
                 f'{sum(p.numel() for p in self.params) / 1e6:.2f}M parameters; git {self.env["git_commit"]}')

    def _start_fid(self):
        """FID during training (training/fid.py) when fid_every > 0; it loads its Inception weights now, before step 1."""
        from training.fid import OFF_HINT, FIDDuringTraining
        c, self.fid, self.fid_postfix = self.c, None, {}
        if not c.fid_every:
            self.say(OFF_HINT)
            return
        self.fid = FIDDuringTraining(self.images, c, self.device, self.dist, self.say)

    # ----- the loop -------------------------------------------------------------------------

    def run(self):
        """Algorithm 1 plus bookkeeping: repeat { x_0 ~ data; a gradient step on L_simple } until done."""
        c = self.c
        self.raw_model.train()
        epoch, start_batch = divmod(self.step, self.steps_per_epoch)
        # closing(bar): an exception (OOM, a failed save) ends the bar's line, so the error starts its own.
        with GracefulStop() as self.stop, closing(self.bar):
            while self.step < self.total_steps and self.stop_reason is None:
                self.loader.set_epoch(epoch)
                self.bar.set_description(f'epoch {epoch + 1}/{c.num_epochs}')
                for batch in self.loader.iterate(start_batch):
                    x_0, labels = batch if c.class_cond else (batch, None)
                    loss, grad_norm, finite = self.run_step(x_0, labels)
                    if self.bad_in_a_row >= MAX_BAD_STEPS:
                        self.stop_reason = 'nan'
                        break
                    self.log_step(loss, grad_norm, finite)
                    if self.stop_agreed if self.dist.world_size > 1 else self.stop.requested:
                        self.stop_reason = 'signal'
                        break
                    if self.step >= self.total_steps:
                        break
                start_batch = 0
                epoch = self.step // self.steps_per_epoch
                if self.step % self.steps_per_epoch == 0 and self.stop_reason is None:
                    self.end_of_epoch(epoch)
        self.bar.close()
        return self.finish()

    def run_step(self, x_0, labels=None):
        """One optimizer step; returns (loss, grad_norm, finite). A non-finite step is skipped, not applied."""
        c, rank, per_rank = self.c, self.dist.rank, self.per_rank
        x_0 = x_0.contiguous(memory_format=self.memory_format)
        # t and eps for the global batch from (seed, step); this rank takes its slice.
        t_all, eps_all, w_all = step_noise(self.noise_generator, c.seed, self.step, c.batch_size,
                                           tuple(self.images.shape[1:]), c.timesteps, self.t_sampler)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        t, eps, weights = t_all[mine], eps_all[mine], w_all[mine] if w_all is not None else None
        if labels is not None:
            labels = drop_labels(self.cond_generator, stream_seed('cond', c.seed, self.step), labels,
                                 c.p_uncond, self.raw_model.network.null_class, c.batch_size, rank)
        torch.manual_seed(stream_seed('dropout', c.seed, self.step, rank))
        for group in self.optimizer.param_groups:
            group['lr'] = c.lr * min(1.0, (self.step + 1) / max(1, c.warmup_steps))
        loss, per_image = self.forward_backward(x_0, t, eps, weights, labels)
        self.scaler.unscale_(self.optimizer)   # clip the true gradients (a no-op without fp16)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip if c.grad_clip > 0 else math.inf)
        # A NaN/inf loss can come with finite gradients (e.g. a NaN added outside the graph): check both.
        loss_ok, grads_ok = self.agree(torch.isfinite(torch.as_tensor(loss)), torch.isfinite(grad_norm))
        finite = loss_ok and grads_ok
        if finite:
            self.scaler.step(self.optimizer)   # optimizer.step(), through the scaler when it is on
            ema_update(self.ema_params, self.params, ema_decay_at(self.step, c.ema_decay))
            self.bad_in_a_row = 0
            if self.t_sampler is not None:
                self.t_sampler.update(t_all, per_image, self.dist.world_size)
        elif loss_ok and self.scaler.is_enabled():
            # fp16 loss scaling overflowed: the scaler lowers its scale and the step is skipped.
            # That is the scaler's normal search for a scale, not a NaN failure.
            self.scale_skipped += 1
        else:
            # Skip the update (the batch is still consumed, so data order is unchanged):
            # NaN never reaches the weights; too many in a row stops the run.
            self.nan_skipped += 1
            self.bad_in_a_row += 1
            self.say(f'step {self.step}: non-finite loss/gradient, update skipped ({self.bad_in_a_row} in a row)')
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.bar.update(1)
        return loss, grad_norm, finite

    def forward_backward(self, x_0, t, eps, weights=None, labels=None):
        """The loss over accum_steps micro-batches, gradients summed as for one batch.

        Returns the mean loss and, for importance sampling, this rank's per-image losses (else None).
        """
        accum, micro, loss_value, per_image = self.c.accum_steps, self.micro, 0.0, []
        for m in range(accum):
            sl = slice(m * micro, (m + 1) * micro)
            sync = m == accum - 1 or self.dist.world_size == 1
            no_sync = not sync and hasattr(self.train_module, 'no_sync')
            with self.train_module.no_sync() if no_sync else nullcontext(), autocast(self.device,
                                                                                     self.autocast_dtype):
                # Class labels as a keyword only when there are some: the unconditional call is unchanged.
                cond = {} if labels is None else {'labels': labels[sl]}
                if self.t_sampler is None:
                    loss = self.train_module(x_0[sl], t[sl], eps[sl], **cond)
                else:   # weights 1 / (T p_t) keep the weighted mean an unbiased estimate of the bound
                    losses = self.train_module(x_0[sl], t[sl], eps[sl], 'none', **cond)
                    per_image.append(losses.detach().float())
                    loss = (losses * weights[sl]).mean() if weights is not None else losses.mean()
            self.scaler.scale(loss / accum).backward()
            loss_value += loss.detach() / accum
        return loss_value, torch.cat(per_image) if per_image else None

    def agree(self, loss_ok, grads_ok):
        """(loss finite, gradients finite) on every rank. Under DDP one collective a step settles both and
        the stop flag: one rank's bad share makes every rank skip (or the replicas diverge), and a
        signal on any rank stops all after this step."""
        if self.dist.world_size == 1:
            return bool(loss_ok), bool(grads_ok)
        device = self.device
        flags = torch.stack([loss_ok.to(device=device, dtype=torch.float32).reshape(()),
                             grads_ok.to(device=device, dtype=torch.float32).reshape(()),
                             torch.tensor(0.0 if self.stop.requested is not None else 1.0, device=device)])
        torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MIN)
        self.stop_agreed = bool(flags[2] == 0)
        if self.stop_agreed and self.stop.requested is None:
            self.stop.requested = 'signal'
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def log_step(self, loss, grad_norm, finite):
        """Every log_every steps: the mean loss since the last log (finite steps only), lr, grad norm, images/s."""
        c = self.c
        if finite:  # a skipped step's NaN stays out of the logged mean
            self.loss_sum, self.loss_count = self.loss_sum + float(loss), self.loss_count + 1
        self.log_images += c.batch_size
        if not ((self.step % c.log_every == 0 or self.step == self.total_steps) and self.loss_count):
            return
        mean_loss = self.loss_sum / self.loss_count
        if self.dist.world_size > 1:  # the loss of the global batch, not only of rank 0's share of it
            mean_loss = torch.tensor([mean_loss], device=self.device)
            torch_dist.all_reduce(mean_loss)
            mean_loss = mean_loss.item() / self.dist.world_size
        now = time.perf_counter()
        if self.is_main:
            ips = self.log_images / max(now - self.log_t, 1e-9)
            self.writer.add_scalar('train/loss', mean_loss, self.step)
            self.writer.add_scalar('train/lr', self.optimizer.param_groups[0]['lr'], self.step)
            # clip_grad_norm_'s return value: the norm before clipping (the applied one is min(this, grad_clip)).
            self.writer.add_scalar('train/grad_norm_preclip', float(grad_norm), self.step)
            self.writer.add_scalar('train/images_per_sec', ips, self.step)
            self.bar.set_postfix(loss=f'{mean_loss:.4f}', img_s=f'{ips:.1f}', **self.fid_postfix)
        self.log_t, self.log_images, self.loss_sum, self.loss_count = now, 0, 0.0, 0

    # ----- epoch ends and the end of the run ------------------------------------------------

    def end_of_epoch(self, epoch):
        if epoch % self.c.save_every == 0:
            path = self.save(tag_epoch=epoch)
            self.say(f'saved {path} and ddpm_epoch_{epoch}.pth')
        if epoch % self.c.sample_every == 0:
            sample_grid(self, epoch)
        if self.fid is not None and epoch % self.c.fid_every == 0:
            evaluate_fid(self, epoch)
        self.dist.barrier()

    def finish(self):
        """Save, draw the final grid and report how the run ended; returns the trained model."""
        epoch = self.step // self.steps_per_epoch
        if self.stop_reason == 'nan':
            if self.writer:
                self.writer.close()
            raise FloatingPointError(f'training stopped: {MAX_BAD_STEPS} non-finite losses in a row at step '
                                     f'{self.step}; {self.kept()}; lower lr or check the data')
        path = self.save()
        if self.stop_reason is None and self.grid_made_at != self.step:
            sample_grid(self, epoch)  # the end of training always gets a grid (also when max_steps ends it mid-epoch)
        self.dist.barrier()
        if self.stop_reason == 'signal':
            self.say(f'stopped by {self.stop.requested} at step {self.step}; saved {path}; continue with '
                     f'--resume latest')
        else:
            self.say(f'done: {self.step} steps; saved {path}')
        if self.writer:
            self.writer.close()
        # How the run ended, for scripts that call train_ddpm. The EMA model is what every sample
        # path uses, so it is what the run returns; the raw weights are the checkpoint's model_state_dict.
        self.ema_model.train_stats = {'step': self.step, 'nan_skipped': self.nan_skipped,
                                      'scale_skipped': self.scale_skipped, 'stopped_by': self.stop_reason}
        return self.ema_model

    def kept(self):
        return (f'the last good checkpoint is kept ({self.latest_path})' if os.path.exists(self.latest_path)
                else 'no checkpoint had been saved yet')

    def state(self):
        """Everything a checkpoint holds."""
        state = {'model_state_dict': self.raw_model.state_dict(), 'ema_state_dict': self.ema_model.state_dict(),
                 'optimizer_state_dict': self.optimizer.state_dict(), 'epoch': self.step // self.steps_per_epoch,
                 'step': self.step, 'config': self.plain_config, 'nan_skipped': self.nan_skipped,
                 'scale_skipped': self.scale_skipped, 'environment': self.env}
        if self.scaler.is_enabled():
            state['scaler_state_dict'] = self.scaler.state_dict()
        if self.t_sampler is not None:
            state['timestep_sampler'] = self.t_sampler.state_dict()
        return state

    def save(self, tag_epoch=None):
        """Write ddpm_latest.pth (and ddpm_epoch_N.pth) from rank 0, atomically; never NaN/inf weights."""
        # Every rank holds the same weights, so every rank stops here together.
        if not all(bool(torch.isfinite(p).all()) for p in self.params + self.ema_params):
            raise FloatingPointError(f'training stopped: the weights became NaN/inf by step {self.step} and were '
                                     f'not saved; {self.kept()}; lower lr or check the data')
        if not self.is_main:
            return None
        state = self.state()
        if tag_epoch is not None:
            save_checkpoint(state, os.path.join(self.c.checkpoint_dir, f'ddpm_epoch_{tag_epoch}.pth'))
        return save_checkpoint(state, self.latest_path)
