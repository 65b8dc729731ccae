"""Models of normal operation: the normality model, the detector and the KDE-AMD baseline."""
