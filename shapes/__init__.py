"""The shapes world: a synthetic text-to-image world with an exact oracle.

`shapes.world` defines prompts, scenes, rendering and captions; `shapes.oracle` parses any image
(clean render or model generation) back into objects and checks it against a prompt;
`shapes.pretrain_vq` trains the Janus VQ-VAE of the from-scratch shapes model.
"""
