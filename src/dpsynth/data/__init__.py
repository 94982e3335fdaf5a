"""Raw data sources and their conversion into dpsynth's uint8 NHWC splits.

One reader per format (`digits`, `cifar10`, `imagenet32`, `camelyon17`,
`imagefolder`, `npz`) behind the `DataSource` protocol in `sources`;
`transforms` brings images to the configured size and channels, and `splits`
carves the public / private / test roles out of a pool.
"""
