"""``realisid faces``: detect faces in photos and compare identities; ``--sample-photos`` exports the real photos
that ship in installed packages."""
from __future__ import annotations

import os
import sys


SAMPLE_PHOTOS = {"astronaut.png": ("skimage", None), "t1.jpg": ("insightface", "data/images/t1.jpg"),
                 "tom_hanks.png": ("insightface", "data/images/Tom_Hanks_54745.png")}


def export_sample_photos(out_dir: str) -> list[str]:
    """Real photos that ship inside installed packages (scikit-image's astronaut, insightface's six-person t1.jpg and
    Tom Hanks) copied to ``out_dir``, for trying the face analyzers offline."""
    import importlib.util

    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, (package, rel) in SAMPLE_PHOTOS.items():
        dest = os.path.join(out_dir, name)
        if package == "skimage":
            import skimage.data

            Image.fromarray(skimage.data.astronaut()).save(dest)
        else:
            spec = importlib.util.find_spec(package)
            src = os.path.join(list(spec.submodule_search_locations)[0], rel) if spec and spec.submodule_search_locations else ""
            if not os.path.exists(src):
                raise FileNotFoundError(f"{name}: {package} is not installed with its data files ({src or package}); run `make setup`")
            Image.open(src).convert("RGB").save(dest)
        paths.append(dest)
    return paths


def cmd_faces(args) -> int:
    """Detect the faces of each photo and, for two or more, compare the largest face of each with the first's."""
    import numpy as np

    from realisid.data.shards import decode_image
    from realisid.faces import analyzer_config, load_face_analyzer

    if args.sample_photos:
        for path in export_sample_photos(args.sample_photos):
            sys.stdout.write(f"{path}\n")
        if not args.photos:
            return 0
    if not args.photos:
        raise ValueError("give one or more photos (or --sample-photos DIR to get real ones from installed packages)")
    cfg = analyzer_config(None, args.analyzer, args.model_dir)
    if cfg is None:
        raise ValueError("no face analyzer is installed; run `make setup` (it installs yunet-sface and dlib)")
    analyzer = load_face_analyzer(cfg)
    sys.stdout.write(f"analyzer: {analyzer.name} (embedding {analyzer.embedding_dim}-D"
                     + (f", same person above cosine {analyzer.match_threshold:g})\n" if hasattr(analyzer, "match_threshold") else ")\n"))
    main_faces = []
    for path in args.photos:
        with open(path, "rb") as f:
            img = np.asarray(decode_image(f.read(), path))
        faces = analyzer.detect(img)
        sys.stdout.write(f"{path}: {img.shape[1]}x{img.shape[0]}, {len(faces)} face(s)\n")
        for i, face in enumerate(faces):
            box = ",".join(f"{v:.0f}" for v in face.bbox)
            kps = " ".join(f"({x:.0f},{y:.0f})" for x, y in face.kps)
            extra = f", {len(face.landmarks)} dense contours" if face.landmarks else ""
            sys.stdout.write(f"  face {i + 1}: box {box}, score {face.det_score:.2f}, key points {kps}{extra}\n")
        largest = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])) if faces else None
        main_faces.append(None if largest is None else analyzer.embed(img, largest.kps))
    if len(args.photos) > 1 and main_faces[0] is not None:
        thr = getattr(analyzer, "match_threshold", None)
        for path, emb in zip(args.photos[1:], main_faces[1:]):
            if emb is None:
                continue
            cos = float(np.dot(main_faces[0], emb))
            verdict = "" if thr is None else (" -> same person" if cos > thr else " -> different people")
            sys.stdout.write(f"cosine({args.photos[0]}, {path}) = {cos:.3f}{verdict}\n")
    return 0


def add_faces_parser(sub) -> None:
    fa = sub.add_parser("faces", help="detect faces in photos and compare identities with a real analyzer (offline)")
    fa.add_argument("photos", nargs="*", help="photos; with two or more, the largest face of each is compared with the first's")
    fa.add_argument("--analyzer", default=None, help="yunet-sface (default), dlib, insightface (with --model-dir)")
    fa.add_argument("--model-dir", default=None, help="an insightface model folder")
    fa.add_argument("--sample-photos", metavar="DIR", default=None,
                    help="first write real photos that ship in installed packages to DIR (astronaut, t1 group photo, Tom Hanks)")
    fa.set_defaults(func=cmd_faces)
