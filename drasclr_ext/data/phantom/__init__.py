"""Synthetic chest CT phantoms with emphysema subtypes and exact ground truth.

Arrays are (X, Y, Z) stored in DICOM (LPS) index order, i.e. index x grows toward the patient's left, y toward
posterior, z toward the head, so the RAS affine is ``diag(-sx, -sy, sz)`` plus an origin; this is what MONAI's
``LoadImage`` returns for a usual axial CT series. Anatomy is defined analytically in a *body frame* (mm, x to the
patient's left, y posterior, z up from the lowest point of the lungs) and evaluated with numpy broadcasting, so nothing
loops over voxels.

Modules, in the order a phantom is made: ``subject`` (the random parameters), ``grid`` (voxel grid, random fields,
painting), ``anatomy`` (lungs, body, vessels and airways), ``emphysema`` (the lesions), ``scanner`` (point spread,
kernel, noise, ground truth), ``generator`` (:func:`generate_phantom`), ``cohort`` (a cohort on disk).
"""

from drasclr_ext.data.phantom.anatomy import canonical_lung_mask
from drasclr_ext.data.phantom.cohort import write_phantom_cohort
from drasclr_ext.data.phantom.generator import generate_phantom
from drasclr_ext.data.phantom.subject import SEVERITY_CLASSES, PhantomSubject, draw_subject

__all__ = [
    "SEVERITY_CLASSES",
    "PhantomSubject",
    "canonical_lung_mask",
    "draw_subject",
    "generate_phantom",
    "write_phantom_cohort",
]
