"""MagicStyle nodes: portrait stylisation after a reference style image."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.adain import adain_latent


class AdaINLatent(io.ComfyNode):
    """z_T^CS = AdaIN(z_T^C, z_T^S): the starting latent of MagicStyle's FFF."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessAdaINLatent",
            display_name="Likeness AdaIN Latent",
            category="likeness/magicstyle",
            description="Gives each content latent the per-channel mean and standard deviation "
                        "(over height and width) of the style latent (MagicStyle Eq. 4).",
            inputs=[
                io.Latent.Input("content", tooltip="Inverted content latent(s), z_T^C."),
                io.Latent.Input("style", tooltip="Inverted style latent, z_T^S: one image, "
                                "or one per content image."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="AdaIN(content, style).")],
        )

    @classmethod
    def execute(cls, content: dict, style: dict) -> io.NodeOutput:
        samples = adain_latent(content["samples"], style["samples"])
        out = {key: value for key, value in content.items() if key != "noise_mask"}
        out["samples"] = samples
        return io.NodeOutput(out)


NODES = [AdaINLatent]
