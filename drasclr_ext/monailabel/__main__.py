"""``python -m drasclr_ext.monailabel`` (see :mod:`drasclr_ext.monailabel.launcher`)."""

from drasclr_ext.monailabel.launcher import main

if __name__ == "__main__":
    main()
