# Autoscaling. The master scales on CPU and on requests per target; each worker service
# scales on the backlog per worker of its capability: the steps queued (QueueDepth, which
# counts queued and delayed) plus the steps in flight (InFlight), both published by the
# master (EMF, namespace Ensemble, dimension Capability), divided by the service's running
# tasks. In-flight steps count: without them, saturated workers with a momentarily empty
# queue read 0 and scale-in starts. The target is MAX_CONCURRENCY: each task kept full.
# Scale-out reacts in a minute; scale-in waits five, so a burst's tail does not flap.
# checks/tests/deploy simulates this policy over a load curve.

locals {
  scale_out_cooldown = 60
  scale_in_cooldown  = 300
}

# --- master
resource "aws_appautoscaling_target" "master" {
  service_namespace  = "ecs"
  resource_id        = "service/${aws_ecs_cluster.main.name}/${aws_ecs_service.master.name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = var.master_min_count
  max_capacity       = var.master_max_count
}

resource "aws_appautoscaling_policy" "master_cpu" {
  name               = "${local.prefix}-master-cpu"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.master.service_namespace
  resource_id        = aws_appautoscaling_target.master.resource_id
  scalable_dimension = aws_appautoscaling_target.master.scalable_dimension

  target_tracking_scaling_policy_configuration {
    target_value       = 60
    scale_out_cooldown = local.scale_out_cooldown
    scale_in_cooldown  = local.scale_in_cooldown
    predefined_metric_specification {
      predefined_metric_type = "ECSServiceAverageCPUUtilization"
    }
  }
}

resource "aws_appautoscaling_policy" "master_requests" {
  name               = "${local.prefix}-master-requests"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.master.service_namespace
  resource_id        = aws_appautoscaling_target.master.resource_id
  scalable_dimension = aws_appautoscaling_target.master.scalable_dimension

  target_tracking_scaling_policy_configuration {
    target_value       = var.master_requests_per_target
    scale_out_cooldown = local.scale_out_cooldown
    scale_in_cooldown  = local.scale_in_cooldown
    predefined_metric_specification {
      predefined_metric_type = "ALBRequestCountPerTarget"
      resource_label         = "${aws_lb.public.arn_suffix}/${aws_lb_target_group.master.arn_suffix}"
    }
  }
}

# --- workers
resource "aws_appautoscaling_target" "worker" {
  for_each = var.worker_groups

  service_namespace  = "ecs"
  resource_id        = "service/${aws_ecs_cluster.main.name}/${aws_ecs_service.worker[each.key].name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = each.value.min_count
  max_capacity       = each.value.max_count
}

resource "aws_appautoscaling_policy" "worker_backlog" {
  for_each = var.worker_groups

  name               = "${local.prefix}-worker-${each.key}-backlog"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.worker[each.key].service_namespace
  resource_id        = aws_appautoscaling_target.worker[each.key].resource_id
  scalable_dimension = aws_appautoscaling_target.worker[each.key].scalable_dimension

  target_tracking_scaling_policy_configuration {
    # Queued plus in-flight steps per running worker task: a task's MAX_CONCURRENCY.
    target_value       = each.value.max_concurrency
    scale_out_cooldown = local.scale_out_cooldown
    scale_in_cooldown  = local.scale_in_cooldown

    customized_metric_specification {
      metrics {
        id          = "depth"
        label       = "Queued ${each.key} steps"
        return_data = false
        metric_stat {
          # Every master replica publishes the same Redis-wide figure: take the maximum.
          stat = "Maximum"
          metric {
            namespace   = "Ensemble"
            metric_name = "QueueDepth"
            dimensions {
              name  = "Capability"
              value = each.key
            }
          }
        }
      }

      metrics {
        id          = "inflight"
        label       = "In-flight ${each.key} steps"
        return_data = false
        metric_stat {
          stat = "Maximum"
          metric {
            namespace   = "Ensemble"
            metric_name = "InFlight"
            dimensions {
              name  = "Capability"
              value = each.key
            }
          }
        }
      }

      metrics {
        id          = "tasks"
        label       = "Running worker-${each.key} tasks"
        return_data = false
        metric_stat {
          stat = "Average"
          metric {
            namespace   = "ECS/ContainerInsights"
            metric_name = "RunningTaskCount"
            dimensions {
              name  = "ClusterName"
              value = aws_ecs_cluster.main.name
            }
            dimensions {
              name  = "ServiceName"
              value = aws_ecs_service.worker[each.key].name
            }
          }
        }
      }

      metrics {
        id          = "backlog_per_worker"
        label       = "Backlog per ${each.key} worker"
        expression  = "(depth + inflight) / tasks"
        return_data = true
      }
    }
  }
}
