"""Samplers of the two multi-view stages: the official chain (DDIM, eta 0, cfg) and few-step solvers.

Stage 1 (reference image -> 6 RGB views) and stage 2 (6 RGB views -> 6 CCMs) share one pipeline,
`MultiViewSampler.sample`, which reads as named steps (each a public method a subclass may replace):

1. `check_inputs`: images -> model pixels, objects K, generators and recorded draws, resolved options;
2. `encode_conditioning`: text features of the prompt / negative prompt, CLIP local tokens of the
   reference through the Resampler (zeros for the unconditional branch), the fixed camera rows;
3. `prepare_latents`: VAE posterior *samples* (not the mode) of the reference (stage 1: the
   pixel-control latent) or of the six views (stage 2: the 4 extra input channels), times
   `scale_factor`; the start latent, the official "offset noise" `q_sample(ref_mean, t=T-1, noise)`,
   which with the zero-terminal-SNR schedule is exactly the noise;
4. `denoise`: classifier-free guidance (`e = e_u + s (e_c - e_u)`, both branches in one UNet batch,
   uncond rows first) stepped by the chosen sampler (`SamplingOptions.sampler`: the official DDIM, or
   DPM-Solver++(2M) / UniPC on the official timestep grid, see `solvers`);
5. `decode`: VAE decode, `uint8(trunc(255 * clamp((x + 1) / 2, 0, 1)))`, reference frame dropped.

Randomness comes only from the caller's `torch.Generator`s (one per object): the posterior noise,
a second posterior draw for the offset-noise reference, and x_T, in that order, drawn on the
generator's device in float32 (then DDIM's step noise when eta > 0). `RecordedDraws` replaces any of
them (parity tests). A batch of K objects runs as one UNet batch of 2*K*F frames and equals K single
calls with the same generators, for every sampler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .cameras import VIEW_ORDER, camera_tensor
from .config import SamplerConfig
from .solvers import SAMPLERS, check_sampler, make_stage_scheduler
from .stage_model import MultiViewDiffusionModel
from .vae import vae_decode, vae_encode_posterior, vae_sample_scaled_latent


@dataclass
class SamplingOptions:
    """The knobs of one `MultiViewSampler.sample` call (None: the stage config's `SamplerConfig` value).

    Attributes:
        sampler: ``"ddim"`` (official), ``"dpmpp"`` (DPM-Solver++(2M)) or ``"unipc"`` (UniPC); see
            `crm_models.multiview.solvers`.
        num_steps: network calls. DDIM: any count (official uniform discretisation, default the
            config's 50); solvers: 1..50 points of the official grid.
        guidance_scale: classifier-free guidance scale (config: 5.0); 1.0 runs the conditional branch only.
        eta: DDIM stochasticity (config: 0.0, deterministic); the solvers take only 0.
        prompt, negative_prompt: text of the two branches when no text features are passed
            (config: "3D assets" and the official negative prompt).
        decode_reference_frame: stage 1: also decode the reference frame (`decoded` then has F rows).
        return_trajectory: keep every step's x / eps / pred_x0 in `MultiViewOutput.trajectory`.
    """

    sampler: str = "ddim"
    num_steps: int | None = None
    guidance_scale: float | None = None
    eta: float | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    decode_reference_frame: bool = False
    return_trajectory: bool = False

    def replace(self, **changes: Any) -> SamplingOptions:
        """A copy with some fields changed; an unknown name raises TypeError naming it."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(
                f"unknown sampling option(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})"
            )
        return dataclasses.replace(self, **changes)

    def resolved(self, cfg: SamplerConfig) -> SamplingOptions:
        """Every None filled from the stage config, validated (ValueError naming the option)."""
        sampler = str(self.sampler)
        num_steps = cfg.ddim_steps if self.num_steps is None else self.num_steps
        check_sampler(sampler, num_steps)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        eta = self.eta if self.eta is not None else (cfg.eta if sampler == "ddim" else 0.0)
        if eta < 0 or (sampler != "ddim" and eta > 0):
            raise ValueError(f"eta={eta}: must be >= 0, and 0 for the deterministic solver {sampler!r}")
        guidance = cfg.guidance_scale if self.guidance_scale is None else float(self.guidance_scale)
        return SamplingOptions(
            sampler=sampler,
            num_steps=int(num_steps),
            guidance_scale=guidance,
            eta=float(eta),
            prompt=cfg.prompt if self.prompt is None else self.prompt,
            negative_prompt=cfg.negative_prompt if self.negative_prompt is None else self.negative_prompt,
            decode_reference_frame=bool(self.decode_reference_frame),
            return_trajectory=bool(self.return_trajectory),
        )


@dataclass
class RecordedDraws:
    """Random draws of ONE object to use instead of its generator (each optional, float32).

    posterior_noise: stage 1 (1, 4, h, w) for the reference latent; stage 2 (6, 4, h, w) for the views.
    offset_posterior_noise: (1, 4, h, w), the second posterior sample of the reference (offset noise).
    x_T: (F, 4, h, w), the noise of the start latent.
    """

    posterior_noise: torch.Tensor | None = None
    offset_posterior_noise: torch.Tensor | None = None
    x_T: torch.Tensor | None = None


@dataclass
class MultiViewOutput:
    """Result of a sampling call for K objects (R = image size, h = R / 8, F = frames per object).

    images: (K, 6, R, R, 3) uint8, views in frame order [1, 2, 3, 4, 5, 0] = left, bottom, back,
        right, top, front (stage 2: the CCMs, same order, RGB as generated).
    strips: (K, R, 6R, 3) uint8, the six images left to right (what the reconstruction stage reads).
    latents: (K, F, 4, h, w) final latents (stage 1 includes the reference frame).
    decoded: (K, F', 3, R, R) float decoder outputs before clamping (F' = F, or 6 when the
        reference frame is not decoded).
    trajectory: with `SamplingOptions.return_trajectory`: "timesteps" (S,), "x" (S+1, K*F, 4, h, w),
        "eps_uncond", "eps_cond", "eps_guided", "pred_x0" (S, K*F, 4, h, w); plus the conditioning
        tensors "latents_scaled" and "image_embeds".
    """

    images: torch.Tensor
    strips: torch.Tensor
    latents: torch.Tensor
    decoded: torch.Tensor
    trajectory: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SamplingRun:
    """One call's validated inputs (output of `MultiViewSampler.check_inputs`).

    Attributes:
        options: resolved `SamplingOptions` (no None left).
        pixels: model input in [-1, 1]: stage 1 (K, 3, R, R) references; stage 2 (K*6, 3, R, R) views.
        num_objects: K.
        resolution: R (image side; latents are R / 8).
        generators: K generators (None entries: torch's global generator).
        draws: K `RecordedDraws` (empty ones where nothing is recorded).
    """

    options: SamplingOptions
    pixels: torch.Tensor
    num_objects: int
    resolution: int
    generators: list[torch.Generator | None]
    draws: list[RecordedDraws]


@dataclass
class StageConditioning:
    """What every UNet call of a run takes besides x and t (rows: 2K with guidance, uncond first; else K).

    Attributes:
        context: (rows, 77, D) text features.
        image_embeds: (rows, ip_dim, D) Resampler output (zeros-image embedding for the uncond rows).
        camera: (rows * F, camera_dim) camera rows, F per object.
        guided: whether the rows hold both branches (guidance_scale != 1).
        cond_image_embeds: (K, ip_dim, D) the conditional image embedding alone (trajectory record).
    """

    context: torch.Tensor
    image_embeds: torch.Tensor
    camera: torch.Tensor
    guided: bool
    cond_image_embeds: torch.Tensor


@dataclass
class StageLatents:
    """Output of `MultiViewSampler.prepare_latents`.

    Attributes:
        cond_latents: scaled VAE posterior samples: stage 1 (K, 4, h, w) pixel-control latents of the
            references; stage 2 (K*6, 4, h, w) latents of the views.
        x_T: (K*F, 4, h, w) float32 start latent.
    """

    cond_latents: torch.Tensor
    x_T: torch.Tensor


def to_uint8_images(decoded: torch.Tensor) -> torch.Tensor:
    """(N, 3, R, R) decoder output -> (N, R, R, 3) uint8 by truncation, as the official code."""
    x = torch.clamp((decoded.float() + 1.0) / 2.0, min=0.0, max=1.0) * 255.0
    return x.permute(0, 2, 3, 1).to(torch.uint8)  # float -> uint8 truncates toward zero


def images_to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, R, R, 3) -> float (N, 3, R, R) in [-1, 1] as ToTensor + Normalize(0.5, 0.5);
    float input (N, 3, R, R) is returned as is (assumed already in [-1, 1])."""
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, R, R, 3), got {tuple(images.shape)}")
        return (images.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"float images must be (N, 3, R, R) in [-1, 1], got {tuple(images.shape)}")
    return images.float()


def strips_to_views(strips: torch.Tensor, num_views: int = 6) -> torch.Tensor:
    """uint8 strips (K, R, 6R, 3) -> views (K, 6, R, R, 3)."""
    if strips.ndim != 4 or strips.shape[2] != num_views * strips.shape[1] or strips.shape[3] != 3:
        raise ValueError(f"strips must be (K, R, {num_views}R, 3), got {tuple(strips.shape)}")
    k, r = strips.shape[0], strips.shape[1]
    return strips.reshape(k, r, num_views, r, 3).permute(0, 2, 1, 3, 4).contiguous()


def views_to_strips(views: torch.Tensor) -> torch.Tensor:
    """(K, V, R, R, 3) -> (K, R, V*R, 3)."""
    k, v, r = views.shape[:3]
    return views.permute(0, 2, 1, 3, 4).reshape(k, r, v * r, views.shape[-1])


class MultiViewSampler:
    """Runs one stage. `model` is a `MultiViewDiffusionModel` (stage taken from its config).

    `tokenizer` (callable: list[str] -> (N, 77) ids) is only needed when prompts are given as text;
    by default the package's open_clip tokenizer is used.
    """

    def __init__(self, model: MultiViewDiffusionModel, tokenizer: Callable | None = None):
        self.model = model
        self._tokenizer = tokenizer
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def stage(self) -> int:
        return self.model.stage

    # ------------------------------------------------------------------ text / image encoders
    def tokenizer(self) -> Callable:
        if self._tokenizer is None:
            from .tokenizer import OpenCLIPTokenizer

            self._tokenizer = OpenCLIPTokenizer()
        return self._tokenizer

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text features (N, 77, context_dim) of `prompts` (cached per string)."""
        if self.model.text_encoder is None:
            raise ValueError("this model was built without CLIP; pass context / uncond_context tensors")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            ids = self.tokenizer()(list(missing))
            feats = self.model.text_encoder(ids.to(self.model.device)).float()
            self._text_cache.update({p: feats[i : i + 1] for i, p in enumerate(missing)})
        return torch.cat([self._text_cache[p] for p in prompts])

    @torch.no_grad()
    def encode_image_prompt(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        """CLIP local tokens (N, 257, 1280) of preprocessed pixels (N, 3, 224, 224)."""
        if self.model.image_encoder is None:
            raise ValueError("this model was built without CLIP; pass ip_tokens")
        return self.model.image_encoder(clip_pixels).float()

    # ------------------------------------------------------------------ the pipeline
    @torch.no_grad()
    def sample(
        self,
        images: torch.Tensor,
        *,
        ip_tokens: torch.Tensor | None = None,
        clip_pixels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        uncond_context: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
        draws: Sequence[RecordedDraws | None] | None = None,
        options: SamplingOptions | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        **option_overrides: Any,
    ) -> MultiViewOutput:
        """Sample K objects: `check_inputs` -> `encode_conditioning` -> `prepare_latents` -> `denoise`
        -> `decode`.

        Args:
            images: stage 1: the reference images, uint8 (K, R, R, 3) or float (K, 3, R, R) in
                [-1, 1], already resized to R (PIL bilinear, as the official pipeline).
                Stage 2: the six stage-1 views, uint8 (K, 6, R, R, 3) or strips (K, R, 6R, 3), or
                float (K, 6, 3, R, R) in [-1, 1].
            ip_tokens: (K, 257, 1280) CLIP local tokens of the reference; or `clip_pixels`
                (K, 3, 224, 224) to compute them with the model's image encoder.
            context, uncond_context: (K | 1, 77, D) text features; default: encode the options'
                `prompt` / `negative_prompt` with the model's text encoder.
            reference: stage 2 only, optional (K, 3, R, R) / (K, R, R, 3) reference image: only
                used for the offset-noise mean, which has no effect when alpha_bar[T-1] = 0.
            generator: one `torch.Generator` per object (a single one is allowed for K = 1);
                None: torch's global generator.
            draws: per object, recorded draws that replace the generator's (see `RecordedDraws`).
            options: `SamplingOptions` (sampler, num_steps, guidance_scale, eta, prompts, ...).
            callback: called as callback(step_index, timestep, x) after every step.
            **option_overrides: `SamplingOptions` fields given directly (e.g. ``num_steps=10``); they
                override `options`.
        """
        options = (options or SamplingOptions()).replace(**option_overrides)
        run = self.check_inputs(images, generator=generator, draws=draws, options=options)
        cond = self.encode_conditioning(
            run, ip_tokens=ip_tokens, clip_pixels=clip_pixels, context=context, uncond_context=uncond_context
        )
        latents = self.prepare_latents(run, reference=reference)
        x, trajectory = self.denoise(run, cond, latents, callback=callback)
        return self.decode(run, x, trajectory)

    def check_inputs(
        self,
        images: torch.Tensor,
        *,
        generator: torch.Generator | Sequence[torch.Generator | None] | None,
        draws: Sequence[RecordedDraws | None] | None,
        options: SamplingOptions,
    ) -> SamplingRun:
        """Validate the stage config and one call's inputs; ValueError names what is wrong."""
        scfg = self.model.config.sampler
        views, frames = len(scfg.camera_views), scfg.num_frames
        if self.stage == 1 and (scfg.reference_position is None or frames != views + 1):
            raise ValueError("stage 1 needs num_frames = views + 1 with the reference frame last")
        if self.stage == 1 and scfg.reference_position != frames - 1:
            raise ValueError(f"the reference frame must be the last frame ({frames - 1})")
        if self.stage == 2 and frames != views:
            raise ValueError("stage 2 needs num_frames == number of views")
        opts = options.resolved(scfg)
        pixels = self._pixel_input(images)  # stage 1: (K, 3, R, R); stage 2: (K*6, 3, R, R)
        k = pixels.shape[0] if self.stage == 1 else pixels.shape[0] // views
        recorded = list(draws) if draws is not None else [None] * k
        if len(recorded) != k:
            raise ValueError(f"draws has {len(recorded)} entries for {k} objects")
        return SamplingRun(
            options=opts,
            pixels=pixels,
            num_objects=k,
            resolution=int(pixels.shape[-1]),
            generators=_generators(generator, k),
            draws=[d or RecordedDraws() for d in recorded],
        )

    def encode_conditioning(
        self,
        run: SamplingRun,
        *,
        ip_tokens: torch.Tensor | None = None,
        clip_pixels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        uncond_context: torch.Tensor | None = None,
    ) -> StageConditioning:
        """Text features, image-prompt embeddings and cameras of both guidance branches."""
        model, scfg, k = self.model, self.model.config.sampler, run.num_objects
        device = model.device
        if ip_tokens is None:
            if clip_pixels is None:
                raise ValueError("pass ip_tokens (CLIP local tokens) or clip_pixels")
            ip_tokens = self.encode_image_prompt(clip_pixels)
        if ip_tokens.shape[0] != k:
            raise ValueError(f"ip_tokens has {ip_tokens.shape[0]} rows for {k} objects")
        if context is None:
            context = self.encode_text([run.options.prompt])
        if uncond_context is None:
            uncond_context = self.encode_text([run.options.negative_prompt])
        context = _rows(context.to(device, torch.float32), k, "context")
        uncond_context = _rows(uncond_context.to(device, torch.float32), k, "uncond_context")
        ip_tokens = ip_tokens.to(device)
        image_embeds = model.unet.encode_image_prompt(ip_tokens)
        camera = camera_tensor(
            scfg.camera_views,
            scfg.reference_position if self.stage == 1 else None,
            device=device,
            dtype=torch.float32,
        )
        if run.options.guidance_scale == 1.0:  # as the official sampler: the conditional branch only
            return StageConditioning(context, image_embeds, camera.repeat(k, 1), False, image_embeds)
        uncond_embeds = model.unet.encode_image_prompt(torch.zeros_like(ip_tokens[:1])).expand(k, -1, -1)
        return StageConditioning(
            context=torch.cat([uncond_context, context]),
            image_embeds=torch.cat([uncond_embeds, image_embeds]),
            camera=camera.repeat(2 * k, 1),
            guided=True,
            cond_image_embeds=image_embeds,
        )

    def prepare_latents(self, run: SamplingRun, *, reference: torch.Tensor | None = None) -> StageLatents:
        """VAE posterior samples of the conditioning images and the start latent x_T.

        Draws per object, in this order: posterior noise, offset-noise posterior noise, x_T.
        """
        model, device = self.model, self.model.device
        frames = model.config.sampler.num_frames
        mean, _logvar, std = vae_encode_posterior(model.vae, run.pixels.to(device))
        mean, std = mean.float(), std.float()
        lat_shape = mean.shape[1:]
        n_post = 1 if self.stage == 1 else len(model.config.sampler.camera_views)
        post_noise, offset_noise, x_t = [], [], []
        for rec, gen in zip(run.draws, run.generators):
            post_noise.append(_draw(rec.posterior_noise, (n_post, *lat_shape), gen, "posterior_noise"))
            offset_noise.append(_draw(rec.offset_posterior_noise, (1, *lat_shape), gen, "offset_noise"))
            x_t.append(_draw(rec.x_T, (frames, *lat_shape), gen, "x_T"))
        cond_latents = vae_sample_scaled_latent(mean, std, model.scale_factor, torch.cat(post_noise))
        x = self._start_latent(
            torch.cat(x_t).to(device),
            torch.cat(offset_noise).to(device),
            mean,
            std,
            reference,
            run.num_objects,
        )
        return StageLatents(cond_latents=cond_latents, x_T=x)

    def denoise(
        self,
        run: SamplingRun,
        cond: StageConditioning,
        latents: StageLatents,
        *,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The sampling loop: guided eps at every timestep, one scheduler step each.

        Returns the final latents (K*F, 4, h, w) float32 and, with `return_trajectory`, the trajectory
        ("timesteps" (S,), "x" (S+1, K*F, 4, h, w), "eps_uncond", "eps_cond", "eps_guided", "pred_x0"
        (S, K*F, 4, h, w), "latents_scaled", "image_embeds"); else an empty dict. The loop reads nothing
        back from the device (timesteps and schedule values are host numbers).
        """
        model, opts = self.model, run.options
        frames = model.config.sampler.num_frames
        device = model.device
        # stage 1: the clean reference latent overwrites frame F-1 (zeros for uncond);
        # stage 2: the view latents are 4 extra input channels (zeros for uncond)
        cond_name = "ip_img" if self.stage == 1 else "pixel_latents"
        lat = latents.cond_latents
        unet_kwargs = {cond_name: torch.cat([torch.zeros_like(lat), lat]) if cond.guided else lat}
        sched = make_stage_scheduler(
            opts.sampler, model.alphas_cumprod, model.config.schedule, opts.num_steps
        )
        x = latents.x_T
        keep = opts.return_trajectory
        traj: dict[str, list[torch.Tensor]] = {
            "x": [x.clone()] if keep else [],
            "eps_uncond": [],
            "eps_cond": [],
            "eps_guided": [],
            "pred_x0": [],
        }
        lat_shape = x.shape[1:]
        for step, t in enumerate(sched.timesteps.tolist()):
            x_in = torch.cat([x, x]) if cond.guided else x
            t_in = torch.full((x_in.shape[0],), t, device=device, dtype=torch.long)
            eps = model.unet(
                x_in, t_in, cond.context, cond.camera, frames, image_embeds=cond.image_embeds, **unet_kwargs
            ).float()
            if cond.guided:
                eps_u, eps_c = eps.chunk(2)
                e = eps_u + opts.guidance_scale * (eps_c - eps_u)
            else:
                eps_u = eps_c = e = eps
            noise = None
            if opts.eta > 0:
                noise = torch.cat(
                    [_draw(None, (frames, *lat_shape), g, "step noise") for g in run.generators]
                )
                noise = noise.to(device)
            x, pred_x0 = sched.step(e, t, x, eta=opts.eta, variance_noise=noise)
            if keep:
                for name, val in (("eps_uncond", eps_u), ("eps_cond", eps_c), ("eps_guided", e)):
                    traj[name].append(val.clone())
                traj["pred_x0"].append(pred_x0.clone())
                traj["x"].append(x.clone())
            if callback is not None:
                callback(step, int(t), x)
        if not keep:
            return x, {}
        trajectory = {name: torch.stack(vals) for name, vals in traj.items() if vals}
        trajectory["timesteps"] = sched.timesteps.clone()
        trajectory["latents_scaled"] = lat
        trajectory["image_embeds"] = cond.cond_image_embeds
        return x, trajectory

    def decode(
        self, run: SamplingRun, x: torch.Tensor, trajectory: dict[str, torch.Tensor] | None = None
    ) -> MultiViewOutput:
        """Final latents (K*F, 4, h, w) -> `MultiViewOutput` (VAE decode of the six views, uint8, strips)."""
        model, k, res = self.model, run.num_objects, run.resolution
        frames = model.config.sampler.num_frames
        views = len(model.config.sampler.camera_views)
        lat_shape = x.shape[1:]
        latents = x.reshape(k, frames, *lat_shape)
        decode_all = self.stage == 2 or run.options.decode_reference_frame
        keep = list(range(frames)) if decode_all else list(range(views))
        decoded = vae_decode(
            model.vae, latents[:, keep].reshape(-1, *lat_shape).to(model.unet.dtype), model.scale_factor
        ).float()
        uint8 = to_uint8_images(decoded).reshape(k, len(keep), res, res, 3)[:, :views]
        decoded = decoded.reshape(k, len(keep), 3, res, res)
        return MultiViewOutput(uint8, views_to_strips(uint8), latents, decoded, dict(trajectory or {}))

    # ------------------------------------------------------------------ helpers
    def _pixel_input(self, images: torch.Tensor) -> torch.Tensor:
        views = len(self.model.config.sampler.camera_views)
        if self.stage == 1:
            out = images_to_model_input(images)
        else:
            if images.dtype == torch.uint8 and images.ndim == 4:
                images = strips_to_views(images, views)
            if images.ndim != 5 or images.shape[1] != views:
                raise ValueError(
                    f"stage-2 input must be (K, {views}, ...) views or (K, R, {views}R, 3) strips"
                )
            out = images_to_model_input(images.reshape(-1, *images.shape[2:]))
        if out.shape[-1] != out.shape[-2]:
            raise ValueError(f"images must be square, got {tuple(out.shape[-2:])}")
        return out

    def _start_latent(self, noise, offset_noise, mean, std, reference, k) -> torch.Tensor:
        """Official offset noise: q_sample(ones * mean_hw(ref latent), T-1, noise) per object."""
        model = self.model
        frames = model.config.sampler.num_frames
        t_last = model.config.schedule.timesteps - 1
        sqrt_ab = model.sqrt_alphas_cumprod[t_last].float()
        sqrt_1mab = model.sqrt_one_minus_alphas_cumprod[t_last].float()
        if bool(sqrt_ab == 0):  # zero terminal SNR: x_T is exactly the noise
            return sqrt_1mab * noise
        if self.stage == 1:
            ref_mean, ref_std = mean, std
        else:
            if reference is None:
                raise ValueError("this schedule has alpha_bar[T-1] > 0: stage 2 needs the reference image")
            ref = images_to_model_input(reference).to(model.device)
            ref_mean, _, ref_std = vae_encode_posterior(model.vae, ref)
            ref_mean, ref_std = ref_mean.float(), ref_std.float()
        ref_latent = vae_sample_scaled_latent(ref_mean, ref_std, model.scale_factor, offset_noise)
        x0 = ref_latent.mean(dim=(2, 3), keepdim=True).repeat_interleave(frames, 0).expand_as(noise)
        return sqrt_ab * x0 + sqrt_1mab * noise


def _generators(generator, k: int) -> list[torch.Generator | None]:
    if generator is None or isinstance(generator, torch.Generator):
        if k > 1 and generator is not None:
            raise ValueError(f"{k} objects need a list of {k} generators (one per object)")
        return [generator] * k
    gens = list(generator)
    if len(gens) != k:
        raise ValueError(f"got {len(gens)} generators for {k} objects")
    return gens


def _draw(recorded: torch.Tensor | None, shape, gen: torch.Generator | None, what: str) -> torch.Tensor:
    """Standard-normal draw of `shape` from `gen` (on its device, float32), or the recorded one."""
    if recorded is not None:
        if tuple(recorded.shape) != tuple(shape):
            raise ValueError(f"recorded {what} has shape {tuple(recorded.shape)}, expected {tuple(shape)}")
        return recorded.float()
    device = gen.device if gen is not None else "cpu"
    return torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)


def _rows(t: torch.Tensor, k: int, name: str) -> torch.Tensor:
    if t.ndim != 3:
        raise ValueError(f"{name} must be (K | 1, tokens, dim), got {tuple(t.shape)}")
    if t.shape[0] == k:
        return t
    if t.shape[0] == 1:
        return t.expand(k, -1, -1)
    raise ValueError(f"{name} has {t.shape[0]} rows for {k} objects")


__all__ = [
    "SAMPLERS",
    "VIEW_ORDER",
    "MultiViewOutput",
    "MultiViewSampler",
    "RecordedDraws",
    "SamplingOptions",
    "SamplingRun",
    "StageConditioning",
    "StageLatents",
    "images_to_model_input",
    "strips_to_views",
    "to_uint8_images",
    "views_to_strips",
]
