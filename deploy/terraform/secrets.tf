# Secrets Manager: every secret a task receives, injected by ECS (`secrets`/`valueFrom`),
# never written into a task definition. Tokens and the Redis password are generated once;
# `ignore_changes` keeps the stored value afterwards (rotate with `put-secret-value`, then
# force a new deployment; for REDIS_PASSWORD see the README's rotation note).

locals {
  # Environment variable name => prefix of the generated value. API_KEYS and
  # OPERATOR_API_KEYS are `client:key` lists.
  generated_secrets = {
    REDIS_PASSWORD    = ""
    WORKER_TOKEN      = ""
    GATEWAY_TOKEN     = ""
    API_KEYS          = "default:"
    OPERATOR_API_KEYS = "operator:"
    # Signs completion callbacks (Ensemble-Signature); receivers verify with it.
    CALLBACK_SECRET = "whsec_"
  }

  secret_arns = merge(
    { for k, s in aws_secretsmanager_secret.generated : k => s.arn },
    { GEMINI_API_KEY = aws_secretsmanager_secret.gemini_api_key.arn },
  )
}

data "aws_secretsmanager_random_password" "generated" {
  for_each = local.generated_secrets

  password_length = 40
  # ElastiCache AUTH tokens refuse @, " and /; letters and digits suit a header too.
  exclude_punctuation = true
}

resource "aws_secretsmanager_secret" "generated" {
  #checkov:skip=CKV2_AWS_57:Static shared tokens read at task start; no rotation Lambda can restart the tasks or change the ElastiCache AUTH token in step. Rotation is a documented manual procedure (deploy/README.md).
  for_each = local.generated_secrets

  name                    = "${local.prefix}/${each.key}"
  description             = "Ensemble ${each.key}"
  kms_key_id              = aws_kms_key.main.arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "generated" {
  for_each = local.generated_secrets

  secret_id     = aws_secretsmanager_secret.generated[each.key].id
  secret_string = "${each.value}${data.aws_secretsmanager_random_password.generated[each.key].random_password}"

  lifecycle {
    # The data source draws a new password on every plan; keep the first one.
    ignore_changes = [secret_string]
  }
}

resource "aws_secretsmanager_secret" "gemini_api_key" {
  #checkov:skip=CKV2_AWS_57:A third-party API key; Google issues it and only the operator can rotate it.
  name                    = "${local.prefix}/GEMINI_API_KEY"
  description             = "Google Gemini API key for the llm-gateway (put your key here when llm_provider = gemini)"
  kms_key_id              = aws_kms_key.main.arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "gemini_api_key" {
  secret_id = aws_secretsmanager_secret.gemini_api_key.id
  # A placeholder so tasks can start; set the real key with `aws secretsmanager put-secret-value`.
  secret_string = "unset"

  lifecycle {
    ignore_changes = [secret_string]
  }
}
