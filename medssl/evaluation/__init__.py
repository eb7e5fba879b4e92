"""medssl.evaluation"""
