"""A diffusers pipeline for class-conditional torchdiffusion runs, written as ``pipeline.py`` beside the weights by
``torchdiffusion export-diffusers`` (diffusers' own ``DDPMPipeline`` and ``DDIMPipeline`` cannot pass class labels).

This file is never imported by torchdiffusion: it is copied into the exported folder, whose ``model_index.json``
names it (``"_class_name": ["pipeline", "ClassConditionalPipeline"]``), so that

    pipe = DiffusionPipeline.from_pretrained(OUT)        # or custom_pipeline=OUT/pipeline.py
    images = pipe(class_labels=[3, 7], guidance_scale=1.5, num_inference_steps=50, output_type="np").images

runs in diffusers alone. The UNet2DModel's class embedding has ``num_classes + 1`` rows: the last one,
``num_classes``, is the null class that classifier-free guidance uses for its unconditional half (the class
torchdiffusion trained with label dropout). ``guidance_scale`` is diffusers' ``1 + w``: at most 1 no guidance.
Noise is drawn as diffusers draws it (``randn_tensor``: a list of generators gives each image its own), so a list
of generators gives the images ``torchdiffusion.Pipeline`` gives for the same list.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class ClassConditionalPipeline(DiffusionPipeline):
    """``unet`` (a class-conditional ``UNet2DModel``) and a DDPM-type ``scheduler``; ``num_classes`` real classes
    plus the null class ``num_classes`` for guidance."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, num_classes: int | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        if num_classes is None:
            num_classes = int(unet.config.num_class_embeds) - 1
        self.register_to_config(num_classes=int(num_classes))
        self._interrupt = False

    @property
    def null_class(self) -> int:
        return int(self.config.num_classes)

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @torch.no_grad()
    def __call__(self, class_labels=None, batch_size: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float = 1.0, generator=None, eta: float = 0.0, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        """``class_labels``: an int or a list (one image each; None: the null class, i.e. unconditional);
        ``batch_size``: the number of images (with an int label or none); the rest as in ``DDIMPipeline``."""
        k = self.null_class
        if class_labels is None:
            labels = [k] * (batch_size or 1)
        elif isinstance(class_labels, int):
            labels = [class_labels] * (batch_size or 1)
        else:
            labels = [int(c) for c in class_labels]
            if batch_size is not None and batch_size != len(labels):
                raise ValueError(f"batch_size={batch_size} but {len(labels)} class labels were given")
        if any(not 0 <= c <= k for c in labels):
            raise ValueError(f"class labels must be in 0..{k - 1} (or {k}, the null class)")
        n = len(labels)
        if num_inference_steps is None:
            num_inference_steps = 1000 if type(self.scheduler).__name__ == "DDPMScheduler" else 50
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (n, self.unet.config.in_channels, *size)
        image = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        y = torch.tensor(labels, device=self.device)
        null = torch.full_like(y, k)
        guided = guidance_scale > 1.0
        self.scheduler.set_timesteps(num_inference_steps)
        step_kw = {"generator": generator}
        if "eta" in inspect.signature(self.scheduler.step).parameters:
            step_kw["eta"] = eta
        self._interrupt = False
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if self.interrupt:
                continue
            if guided:
                out = self.unet(torch.cat([image, image]), t, class_labels=torch.cat([y, null])).sample
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            else:
                out = self.unet(image, t, class_labels=y).sample
            image = self.scheduler.step(out, t, image, **step_kw).prev_sample
            if callback_on_step_end is not None:
                ret = callback_on_step_end(self, i, t, {"latents": image} if "latents" in
                                           callback_on_step_end_tensor_inputs else {})
                image = (ret or {}).get("latents", image)
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            images = image
        else:
            images = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
            elif output_type != "np":
                raise ValueError(f"output_type must be pil, np or pt, got {output_type!r}")
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
