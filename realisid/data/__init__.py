"""Shard format, synthetic faces, the webdataset pipeline and the LightningDataModule."""
