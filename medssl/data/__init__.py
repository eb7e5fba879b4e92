"""medssl.data"""
