"""Trainers of the five methods (DAL, UTAL, UGA, EEA, TSSL) built on fastassoc ops."""
