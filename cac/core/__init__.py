"""The method itself in pure PyTorch (no mmseg): the equations, the Table 5 designs, the classifier
and the loss of Eq. (8)."""
