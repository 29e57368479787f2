"""mkdocs hook: the study reports under results/ (README.md, report.md, curves) become pages
of the site at results/<study>/..., so docs pages and README.md link to the same files."""

import os

from mkdocs.structure.files import File

KEEP = (".md", ".png", ".svg", ".json")


def on_files(files, config):
    root = os.path.dirname(os.path.abspath(config["config_file_path"]))
    results = os.path.join(root, "results")
    for folder, _, names in os.walk(results):
        for name in sorted(names):
            if not name.endswith(KEEP):
                continue
            path = os.path.join(folder, name)
            uri = os.path.relpath(path, root).replace(os.sep, "/")
            files.append(File.generated(config, uri, abs_src_path=path))
    return files
