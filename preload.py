"""Command-line flags of the ColorizeDiffusion extension (read by the webui before it parses the arguments)."""


def preload(parser):
    parser.add_argument(
        "--colorize-dir", type=str, default=None,
        help="ColorizeDiffusion: folder for the OpenCLIP ViT-H/14 weights and the line extractors "
             "(default: <models>/ColorizeDiffusion; overrides the setting)",
    )
