"""Built-in calibration captions: varied subjects, styles, compositions, text in images, scale of detail.

`default_prompts(n, seed)` picks ``n`` of them deterministically; the rest stay unseen and serve as held-out prompts.
"""

from __future__ import annotations

import random

CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon, earth in the sky",
    "a close-up portrait of an elderly fisherman with a weathered face, soft window light",
    "a bowl of ramen with a soft-boiled egg, steam rising, top-down food photography",
    "an isometric illustration of a tiny cozy bookshop on a rainy street at night",
    "a red fox sitting in fresh snow in a birch forest, morning fog",
    "a neon sign that reads 'OPEN 24 HOURS' above a diner door",
    "a watercolor painting of a lighthouse on cliffs during a storm",
    "a macro shot of a dew-covered spider web at sunrise",
    "a modern minimalist living room with a large window onto a pine forest",
    "a medieval castle on a hill surrounded by autumn trees, oil painting",
    "a robot made of brass and glass playing chess in a library",
    "a crowded street market in Marrakech, colorful spices in baskets",
    "a pixel art scene of a knight fighting a dragon over a lava lake",
    "an aerial view of winding rice terraces in Bali after rain",
    "a cat wearing a tiny wizard hat reading a spellbook, digital art",
    "a vintage travel poster of the Swiss Alps with a red train",
    "a sailboat on a calm turquoise sea under towering cumulus clouds",
    "a bustling Tokyo intersection at night in the rain, reflections on asphalt",
    "a still life of lemons, a glass carafe and a blue cloth, Dutch golden age style",
    "a cross-section diagram of a volcano with labeled layers",
    "a child flying a yellow kite on a windy beach, film photograph",
    "a futuristic city with flying cars and vertical gardens, golden hour",
    "a hand-drawn map of an imaginary archipelago with sea monsters",
    "a hummingbird hovering near a purple flower, high shutter speed",
    "a chocolate cake with raspberries on a marble counter, studio lighting",
    "an abstract composition of overlapping circles in primary colors, Bauhaus style",
    "a snowy mountain cabin with warm light in the windows under the northern lights",
    "a coffee cup with latte art shaped like a swan, shallow depth of field",
    "a group of penguins walking across an ice field toward the ocean",
    "a stained glass window depicting a tree of life",
    "a desert highway with a lone motel sign at dusk, cinematic",
    "a pencil sketch of a ballet dancer mid-leap",
    "a hedgehog holding a small umbrella in a spring meadow",
    "an underwater coral reef with a sea turtle and schools of fish",
    "a chalkboard menu listing 'SOUP OF THE DAY: TOMATO' in a cafe",
    "the interior of a gothic cathedral with light beams through the windows",
    "a steampunk airship docked at a floating island",
    "a field of sunflowers under a thunderstorm sky",
    "a 3D render of a glossy toy car on a white background",
    "a quiet Japanese garden with a red bridge over a koi pond in autumn",
)


def default_prompts(n: int = 8, seed: int = 0) -> list[str]:
    """``n`` distinct built-in captions, the same for the same ``seed``."""
    if not 1 <= n <= len(CALIBRATION_PROMPTS):
        raise ValueError(f"there are {len(CALIBRATION_PROMPTS)} built-in calibration prompts; asked for {n}. "
                         "Pass your own prompt list for more")
    return random.Random(seed).sample(list(CALIBRATION_PROMPTS), n)


def held_out_prompts(n: int = 8, seed: int = 0, calibration_n: int = 8) -> list[str]:
    """``n`` built-in captions that ``default_prompts(calibration_n, seed)`` does not use."""
    used = set(default_prompts(calibration_n, seed))
    rest = [p for p in CALIBRATION_PROMPTS if p not in used]
    if n > len(rest):
        raise ValueError(f"only {len(rest)} built-in prompts are left out of calibration; asked for {n}")
    return rest[:n]
