"""What exists only for the embedded default: models trained once on the synthetic faces and shipped as
package data (a tiny base text-to-image model, two stand-in identity encoders, a synthetic face analyzer).

Every one of them is a stand-in, named as such wherever its output appears. Real experiments load real
weights by path and never touch this package. ``make pretrain`` (:mod:`realisid.embedded.pretrain`) is the
recipe that trains them; :mod:`realisid.embedded.assets` finds the shipped copies.
"""
