"""Importers: foreign models (plain ONNX, MONAI bundles, nnU-Net v2 results) turned into segcli bundles.

Each importer reads its format without unpickling arbitrary objects, builds or takes an ONNX graph,
checks it against the stated facts (channels, classes, window, output kind) and writes a bundle whose
only network file is that graph, hashed, with a card stub recording where it came from. The bundle
then runs through segcli's readers, engines and writers like a trained one (``--backend onnx``).
"""
