"""Stand-in ``modules.processing``: ``p`` objects and ``process_images`` with the webui's hook order (§1.3).

Order: ``before_process`` -> ``process`` -> per batch (``n_iter``): interrupt check, ``before_process_batch``,
``process_batch``, conds, ``p.sample`` (txt2img: new sampler, ``process_before_every_sampling``, sample; hires:
new sampler, ``before_hr``, ``process_before_every_sampling``, ``sample_img2img``; img2img: the sampler made in
``init``, ``process_before_every_sampling`` with ``x = init_latent``, ``sample_img2img``, final mask blend with
``on_mask_blend``), decode, ``postprocess_image`` per image -> ``postprocess``. Exceptions from ``p.sample``
propagate (``postprocess`` is then not called), as in the webui.
"""
import torch
import torch.nn.functional as F

from modules import rng, scripts, sd_samplers, shared

opt_f = 8


class Processed:
    def __init__(self, p, images, infotexts=None):
        self.images = images
        self.infotexts = infotexts or []
        self.extra_generation_params = p.extra_generation_params
        self.seed = p.seed
        self.samples = getattr(p, "all_samples", [])
        self.comments = "".join(f"{comment}\n" for comment in p.comments)


class StableDiffusionProcessing:
    def __init__(self, sd_model=None, prompt="", negative_prompt="", seed=1, sampler_name="Euler", steps=3,
                 cfg_scale=7.0, width=64, height=64, batch_size=1, n_iter=1, script_args=None, scripts=None,
                 refiner_checkpoint=None, **kwargs):
        self.sd_model = sd_model if sd_model is not None else shared.sd_model
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.seed = seed
        self.sampler_name = sampler_name
        self.steps = steps
        self.cfg_scale = cfg_scale
        self.width = width
        self.height = height
        self.batch_size = batch_size
        self.n_iter = n_iter
        self.script_args = list(script_args or [])
        self.scripts = scripts
        self.refiner_checkpoint = refiner_checkpoint
        self.extra_generation_params = {}
        self.override_settings = {}
        self.is_api = False
        self.outpath_samples = ""
        self.sampler = None
        self.seeds = []
        self.all_seeds = []
        self.is_hr_pass = False
        self.eta = None
        self.all_samples = []
        self.image_cfg_scale = None
        self.scheduler = None
        self.hr_scheduler = None
        self.s_min_uncond = 0.0
        self.iteration = 0
        self.rng = None
        self.comments = {}
        for key, value in kwargs.items():
            setattr(self, key, value)

    def init(self, all_prompts, all_seeds, all_subseeds):
        pass

    def comment(self, text):
        """A note shown under the image in the UI (the webui's ``p.comment``)."""
        self.comments[text] = 1

    def conds(self, batch):
        c = self.sd_model.get_learned_conditioning([self.prompt] * batch)
        uc = self.sd_model.get_learned_conditioning([self.negative_prompt] * batch)
        return c, uc

    def txt2img_image_conditioning(self, x):
        return x.new_zeros(x.shape[0], 5, 1, 1)


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(self, enable_hr=False, hr_scale=2.0, hr_sampler_name=None, hr_second_pass_steps=0,
                 denoising_strength=0.7, firstpass_image=None, **kwargs):
        super().__init__(**kwargs)
        self.enable_hr = enable_hr
        self.hr_scale = hr_scale
        self.hr_sampler_name = hr_sampler_name
        self.hr_second_pass_steps = hr_second_pass_steps
        self.denoising_strength = denoising_strength
        self.firstpass_image = firstpass_image
        self.hr_upscale_to_x = int(self.width * hr_scale)
        self.hr_upscale_to_y = int(self.height * hr_scale)
        self.truncate_x = 0   # latent columns / rows the webui cuts after upscaling when hires changes the aspect
        self.truncate_y = 0

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        self.rng = rng.ImageRNG((4, self.height // opt_f, self.width // opt_f), seeds)
        x = self.rng.next()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=x, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning,
                                      image_conditioning=self.txt2img_image_conditioning(x))
        if not self.enable_hr:
            return samples
        return self.sample_hr_pass(samples, seeds, conditioning, unconditional_conditioning)

    def sample_hr_pass(self, samples, seeds, conditioning, unconditional_conditioning):
        if shared.state.interrupted:
            return samples
        self.is_hr_pass = True
        self.sampler = sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)
        samples = F.interpolate(samples, size=(self.hr_upscale_to_y // opt_f, self.hr_upscale_to_x // opt_f),
                                mode="nearest")
        # the webui's cut to the hires target size (modules/processing.py, sample_hr_pass)
        samples = samples[:, :, self.truncate_y // 2:samples.shape[2] - (self.truncate_y + 1) // 2,
                          self.truncate_x // 2:samples.shape[3] - (self.truncate_x + 1) // 2]
        self.rng = rng.ImageRNG(samples.shape[1:], seeds)
        noise = self.rng.next()
        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(p=self, x=samples, noise=noise, c=conditioning,
                                                       uc=unconditional_conditioning)
        return self.sampler.sample_img2img(self, samples, noise, conditioning, unconditional_conditioning,
                                           steps=self.hr_second_pass_steps or self.steps,
                                           image_conditioning=self.txt2img_image_conditioning(samples))


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, init_images=None, denoising_strength=0.75, mask=None, **kwargs):
        super().__init__(**kwargs)
        self.init_images = init_images or []
        self.denoising_strength = denoising_strength
        self.image_mask = mask
        self.mask = None
        self.nmask = None
        self.init_latent = None

    def init(self, all_prompts, all_seeds, all_subseeds):
        from lib_colorize.preprocess import image_to_tensor

        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        images = [image_to_tensor(im.convert("RGB").resize((self.width, self.height))) for im in self.init_images]
        batch = torch.cat(images * self.batch_size if len(images) == 1 else images)[: self.batch_size]
        with torch.no_grad():
            self.init_latent = self.sd_model.get_first_stage_encoding(self.sd_model.encode_first_stage(batch))
        if self.image_mask is not None:
            mask = torch.as_tensor(self.image_mask, dtype=torch.float32)
            mask = F.interpolate(mask[None, None], size=self.init_latent.shape[-2:], mode="nearest")[0, 0]
            self.mask = (1.0 - mask).expand_as(self.init_latent[:1]).clone()  # 1 = keep the original
            self.nmask = mask.expand_as(self.init_latent[:1]).clone()       # 1 = repaint

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.rng = rng.ImageRNG(self.init_latent.shape[1:], seeds)
        x = self.rng.next()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=self.init_latent, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        samples = self.sampler.sample_img2img(self, self.init_latent, x, conditioning, unconditional_conditioning,
                                              image_conditioning=self.txt2img_image_conditioning(x))
        if self.mask is not None:
            blended = samples * self.nmask + self.init_latent * self.mask
            if self.scripts is not None:
                mba = scripts.MaskBlendArgs(samples, self.nmask, self.init_latent, self.mask, blended)
                self.scripts.on_mask_blend(self, mba)
                blended = mba.blended_latent
            samples = blended
        return samples


def process_images(p):
    from lib_colorize.preprocess import tensor_to_images

    if p.scripts is not None:
        p.scripts.before_process(p)
    all_seeds = [p.seed + i for i in range(p.batch_size * p.n_iter)]
    p.all_seeds = all_seeds
    if p.scripts is not None:
        p.scripts.process(p)
    p.init([p.prompt] * len(all_seeds), all_seeds, all_seeds)
    images, infotexts = [], []
    for n in range(p.n_iter):
        if shared.state.interrupted or shared.state.skipped:
            break
        p.iteration = n
        p.seeds = all_seeds[n * p.batch_size:(n + 1) * p.batch_size]
        if p.scripts is not None:
            p.scripts.before_process_batch(p, batch_number=n, prompts=[p.prompt] * p.batch_size, seeds=p.seeds,
                                           subseeds=p.seeds)
            p.scripts.process_batch(p, batch_number=n, prompts=[p.prompt] * p.batch_size, seeds=p.seeds,
                                    subseeds=p.seeds)
        c, uc = p.conds(p.batch_size)
        with torch.no_grad():
            samples = p.sample(conditioning=c, unconditional_conditioning=uc, seeds=p.seeds, subseeds=p.seeds,
                               subseed_strength=0.0, prompts=[p.prompt] * p.batch_size)
            p.all_samples.append(samples)
            decoded = p.sd_model.decode_first_stage(samples)
        for image in tensor_to_images(decoded):
            pp = scripts.PostprocessImageArgs(image)
            if p.scripts is not None:
                p.scripts.postprocess_image(p, pp)
            images.append(pp.image)
            infotexts.append(", ".join(f"{k}: {v}" for k, v in p.extra_generation_params.items()))
    processed = Processed(p, images, infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, processed)
    return processed
