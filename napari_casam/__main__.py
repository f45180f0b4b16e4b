"""``python -m napari_casam``: napari with the CA-SAM widget docked and the 3D sample loaded."""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m napari_casam", description=__doc__)
    ap.add_argument("paths", nargs="*", help="images or volumes to open instead of the 3D sample")
    ap.add_argument("--library", default=None, help="task library folder (default $CASAM_LIBRARY or ~/.casam/tasks)")
    args = ap.parse_args(argv)

    import napari

    from ._sample_data import sample_3d
    from ._widget import CASamWidget

    viewer = napari.Viewer(title="CA-SAM")
    if args.paths:
        viewer.open(args.paths, plugin="napari-casam")
    else:
        for data, kwargs, kind in sample_3d():
            getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = CASamWidget(viewer, library=args.library)
    viewer.window.add_dock_widget(widget, name="CA-SAM", area="right")
    napari.run()


if __name__ == "__main__":
    main()
