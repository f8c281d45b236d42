"""The CDK app (aws-cdk-lib v2): constructs own resources and grants, stacks compose them."""
